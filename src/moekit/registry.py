"""Named registries of variants (routers, attention kinds): `@REG.register("name")` on a class,
`REG.get("name")` returns it (an unknown name is a ValueError listing the choices)."""

from __future__ import annotations

from typing import Callable


class Registry(dict):
    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator: file the class under `name` (also set as its `name` attribute)."""

        def deco(cls: type) -> type:
            cls.name = name
            self[name] = cls
            return cls

        return deco

    def get(self, name: str) -> type:
        if name not in self:
            raise ValueError(f"unknown {self.what} {name!r}; choose one of {tuple(self)}")
        return self[name]
