"""The one registry type: methods, scores, transforms and benchmarks are each a `Registry` of named
pieces, looked up by the config value that names them, with one error text for a name it lacks."""

from __future__ import annotations


class Registry(dict):
    """Pieces by name; `registry[name]` of an unknown name is a ValueError naming `setting` and
    the names there are."""

    def __init__(self, setting: str):
        super().__init__()
        self.setting = setting

    def add(self, name: str, piece):
        self[name] = piece
        return piece

    def __missing__(self, name):
        raise ValueError(f"{self.setting}={name!r} is unknown: allowed values are {sorted(self)}")
