"""Exceptions for user mistakes and bad inputs.

Library code raises these; only `cli.main` turns them into a one-line message and an exit code.
Invariants inside the code use `assert`.
"""


class ModularForgeError(Exception):
    """Base class: anything the user can fix (input, config, files on disk)."""


class ConfigError(ModularForgeError):
    """The configuration is invalid: names the key and the fix."""


class DataError(ModularForgeError):
    """Input text or prepared data is missing, unreadable or unusable."""


class TrainingError(ModularForgeError):
    """Training cannot continue (a non-finite loss, an incompatible checkpoint)."""


class AssemblyError(ModularForgeError):
    """An input to assembly is missing, corrupted or incompatible; nothing was written."""


class StageOrderError(ModularForgeError):
    """A stage was asked to run before the stage whose files it reads."""


class RunDirectoryError(ModularForgeError):
    """The folder is not a run directory, or another process is writing into it."""


class FileSystemError(ModularForgeError):
    """A file or folder could not be read or written: full disk, permissions, read-only, missing, wrong kind."""


_OS_ERROR_FIXES = {
    "ENOSPC": "no space left on device; free some space and rerun (finished work is kept)",
    "EDQUOT": "disk quota exceeded; free some space and rerun (finished work is kept)",
    "EACCES": "permission denied",
    "EPERM": "operation not permitted",
    "EROFS": "read-only file system",
    "ENOENT": "not found",
    "EISDIR": "is a folder, not a file",
    "ENOTDIR": "a part of the path is a file, not a folder",
    "EEXIST": "already exists",
    "ENAMETOOLONG": "file name too long",
}


def os_error(e: OSError, path: object = None, doing: str = "cannot access") -> FileSystemError:
    """A one-line FileSystemError for `e` that names `path` (default: the error's own file name)."""
    import errno

    name = errno.errorcode.get(e.errno or 0, "")
    reason = _OS_ERROR_FIXES.get(name) or (e.strerror or str(e)).lower()
    where = path if path is not None else e.filename
    return FileSystemError(f"{doing} {where}: {reason}" if where is not None else f"{doing}: {reason}")
