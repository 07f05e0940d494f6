import pytest

from modularforge.config import config_from_dict, describe_keys, load_config, preset_names, preset_path
from modularforge.errors import ConfigError


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_parses(name):
    cfg = load_config(preset_path(name))
    assert cfg.shared_steps >= 1 and cfg.expert_steps >= 1


def test_presets_include_the_documented_ones():
    assert {"smoke", "demo", "poc-50m", "small"} <= set(preset_names())


def test_poc_50m_preset_is_the_seed_configuration():
    m = load_config(preset_path("poc-50m")).model
    assert (m.hidden_size, m.intermediate_size, m.num_layers, m.num_experts, m.top_k, m.max_seq_len) == (
        512, 2048, 4, 5, 2, 512)
    assert load_config(preset_path("poc-50m")).tokenizer.vocab_size == 16384


def test_unknown_key_names_the_key_and_suggests_the_fix():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": {"hiden_size": 64}})
    assert str(e.value) == "unknown config key 'model.hiden_size'; did you mean 'model.hidden_size'?"


def test_unknown_section_lists_known_sections():
    with pytest.raises(ConfigError, match="unknown config key 'modle'.*did you mean 'model'"):
        config_from_dict({"modle": {}})


def test_top_k_above_num_experts_is_rejected_with_the_fix():
    with pytest.raises(ConfigError, match=r"model.top_k=5 exceeds model.num_experts=4; lower top_k"):
        config_from_dict({"model": {"num_experts": 4, "top_k": 5}})


def test_wrong_type_is_one_line_naming_the_key():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"train": {"lr": "fast"}})
    assert "'train.lr'" in str(e.value) and "\n" not in str(e.value)


def test_literal_choices_are_enforced():
    with pytest.raises(ConfigError, match="'assemble.router'"):
        config_from_dict({"assemble": {"router": "magic"}})


def test_batch_must_be_a_multiple_of_micro_batch():
    with pytest.raises(ConfigError, match="train.batch_size=10 is not a multiple of train.micro_batch_size=4"):
        config_from_dict({"train": {"batch_size": 10, "micro_batch_size": 4}})


def test_set_overrides_are_parsed_as_yaml(tmp_path):
    cfg = load_config(None, ["model.top_k=1", "data.sources=[a.txt, b.txt]", "train.precision=fp32"])
    assert cfg.model.top_k == 1 and cfg.data.sources == ["a.txt", "b.txt"] and cfg.train.precision == "fp32"


def test_malformed_set_is_rejected():
    with pytest.raises(ConfigError, match="--set expects section.key=value"):
        load_config(None, ["model.top_k"])


def test_budget_is_split_between_phases():
    cfg = config_from_dict({
        "model": {"num_experts": 4, "max_seq_len": 100},
        "budget": {"total_tokens": 100_000, "shared_fraction": 0.5},
        "train": {"batch_size": 10}, "experts": {"train": {"batch_size": 5}},
    })
    assert cfg.shared_steps == 50  # 50k tokens / (10 x 100)
    assert cfg.expert_steps == 25  # 50k / 4 experts / (5 x 100)


def test_every_key_is_documented():
    rows = describe_keys()
    assert len(rows) > 60
    assert all(doc for key, _, doc in rows if not key.startswith("experts.train.")), [k for k, _, d in rows if not d]


def test_top_k_changes_assembly_but_retrains_nothing():
    from modularforge.runs import Run

    a, b = Run(config_from_dict({})), Run(config_from_dict({"model": {"top_k": 1}}))
    assert a.fingerprint("train-experts") == b.fingerprint("train-experts")
    assert a.fingerprint("assemble") != b.fingerprint("assemble")
    c = Run(config_from_dict({"model": {"hidden_size": 128}}))
    assert a.fingerprint("train-shared") != c.fingerprint("train-shared")


def test_domain_probe_is_a_shared_phase_option():
    assert config_from_dict({"train": {"domain_probe_weight": 0.3}}).train.domain_probe_weight == 0.3
    with pytest.raises(ConfigError, match="applies to the shared phase only"):
        config_from_dict({"experts": {"train": {"domain_probe_weight": 0.3}}})


@pytest.mark.parametrize("override", [
    "calibrate.temperatures=[0]", "calibrate.temperatures=[]", "calibrate.temperatures=[-1, 1]",
    "run.threads=-1", "run.threads=0", "run.seed=-1", "generate.seed=-1",
    "train.eval_interval=1e20", "train.checkpoint_interval=10000000000000000000000", "budget.total_tokens=1e20",
    "budget.total_tokens=100000000000000", "model.num_layers=true", "train.lr=true", "generate.top_k=false",
    "train.lr=nan", "train.lr=.inf", "generate.temperature=1e-9", "generate.top_p=0", "generate.expert_cache=0",
    "generate.max_new_tokens=-1", "evaluate.window=1", "model.hidden_size=1.5", "model.num_experts='4'",
])
def test_out_of_range_or_mistyped_numbers_are_rejected_naming_the_key(override):
    with pytest.raises(ConfigError, match=r"invalid config"):
        load_config(None, [override])


def test_numbers_in_every_yaml_spelling_are_numbers():
    cfg = load_config(None, ["train.lr=3e-4", "model.rope_theta=1e6", "generate.temperature=1", "run.name=2024"])
    assert (cfg.train.lr, cfg.model.rope_theta, cfg.generate.temperature, cfg.run.name) == (3e-4, 1e6, 1.0, "2024")


def test_auto_shared_fraction_follows_the_measured_curve_and_counts_in_the_fingerprint(monkeypatch, tmp_path):
    from modularforge import config
    from modularforge.runs import Run

    monkeypatch.setattr(config, "SHARED_FRACTION_CURVE", ((0.1, 0.9), (10.0, 0.5)))
    assert config.auto_shared_fraction(0.01) == 0.9 and config.auto_shared_fraction(100.0) == 0.5
    assert config.auto_shared_fraction(1.0) == pytest.approx(0.7)  # halfway in log(tokens per parameter)
    cfg = config.config_from_dict({"budget": {"shared_fraction": "auto"}, "run": {"root": str(tmp_path)}})
    params = cfg.model.dense_parameters(cfg.tokenizer.vocab_size)
    assert cfg.shared_fraction == pytest.approx(config.auto_shared_fraction(cfg.budget.total_tokens / params))
    before = Run(cfg).fingerprint("train-shared")
    monkeypatch.setattr(config, "SHARED_FRACTION_CURVE", ((0.1, 0.8), (10.0, 0.4)))
    assert Run(cfg).fingerprint("train-shared") != before  # a remeasured curve retrains, the word `auto` does not hide it


def test_dense_parameter_count_matches_the_model():
    from modularforge.config import ModelConfig
    from modularforge.model.transformer import CausalLM, count_parameters

    for cfg in (ModelConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2),
                ModelConfig(hidden_size=16, intermediate_size=40, num_layers=1, num_heads=2, tie_embeddings=True)):
        assert cfg.dense_parameters(100) == count_parameters(CausalLM(cfg, 100, moe=False))
