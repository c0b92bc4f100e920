"""How envs report bad ``env_config`` values: one style for every env of the project.

``env_config['key']: what is wrong; how to fix it.`` (nested keys as ``['dataset']['path']``),
and unknown keys with the nearest known one suggested.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence


class ConfigError(ValueError):
    """A bad ``env_config`` value; ``key`` is its dotted path (``dataset.path``)."""

    def __init__(self, key: str, problem: str, fix: str):
        self.key, self.problem, self.fix = key, problem, fix
        where = "env_config" + "".join(f"['{part}']" for part in key.split("."))
        super().__init__(f"{where}: {problem}; {fix if fix.endswith('.') else fix + '.'}")


def config_error(key: str, problem: str, fix: str) -> ConfigError:
    """The error naming the env-config key, what is wrong, and how to fix it."""
    return ConfigError(key, problem, fix)


def check_known_keys(config: Mapping, known: Sequence[str], env_name: str,
                     prefix: str = "", listed: Sequence[str] | None = None) -> None:
    """ConfigError naming every key of ``config`` not in ``known`` (with the nearest known one).
    ``prefix`` names where ``config`` sits in env_config (``"dataset."``); ``listed`` are the
    keys the message offers (default: ``known``)."""
    unknown = sorted(set(config) - set(known), key=str)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hints.append(f"'{prefix}{key}'" + (f" (did you mean '{prefix}{close[0]}'?)"
                                               if close else ""))
        raise ConfigError(prefix + str(unknown[0]),
                          f"{env_name}: unknown env_config key(s) {', '.join(hints)}",
                          f"valid keys are {', '.join(sorted(listed or known))}.")
