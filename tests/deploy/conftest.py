"""The rendered kustomizations, once per session (kubectl kustomize takes about 0.1 s each)."""

from __future__ import annotations

import pytest

from tests.deploy.manifests import KUSTOMIZATIONS, Obj, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[Obj]]:
    return {name: render(name) for name in KUSTOMIZATIONS}
