"""The one base of every error a user can fix by changing a config, a file or the cluster.

Commands print such an error as one clear message and exit with code 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input (config key, data file, checkpoint, storage, cluster size): the message says what to change."""
