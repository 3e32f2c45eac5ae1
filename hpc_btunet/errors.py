"""Errors a user can cause: each carries one message that names the thing and the fix."""


class UserError(Exception):
    """Bad input (paths, data, options). The CLI prints the message alone, without a traceback."""


class DataError(UserError):
    """A dataset to pack is unusable; the message lists every offending file."""


class ShardError(UserError):
    """A packed shard is missing, corrupt or truncated; the message names the shard."""
