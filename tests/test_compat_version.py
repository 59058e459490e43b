"""megatron-core outside the verified range stops with a clear message (the shims use private
megatron APIs); the override turns it into a warning."""

from __future__ import annotations

import pytest

from megatron_flextron.compat.version import (
    OVERRIDE,
    VERIFIED,
    check_megatron_core,
    installed_version,
)


def test_installed_version_is_verified():
    check_megatron_core(installed_version())  # the import of compat already ran it


@pytest.mark.parametrize("version", ["0.16.1", "0.17.0", "0.19.1", "0.19.3", "0.20.0rc1", "1.0.0"])
def test_outside_the_range_fails_with_a_clear_message(version, monkeypatch):
    monkeypatch.delenv(OVERRIDE, raising=False)
    with pytest.raises(RuntimeError, match=f"megatron-core {version} is outside .*{VERIFIED[0]}"):
        check_megatron_core(version)
    monkeypatch.setenv(OVERRIDE, "1")
    with pytest.warns(UserWarning, match="outside the range"):
        check_megatron_core(version)


@pytest.mark.parametrize("version", ["0.19.2", "0.19.2+local"])
def test_inside_the_range_passes(version):
    check_megatron_core(version)
