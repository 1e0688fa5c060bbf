"""Shared test configuration: hypothesis profiles and small fixtures.

Hypothesis' built-in ``ci`` profile is loaded automatically when the CI environment
variable is set; we re-register it with ``deadline=None`` (CPU timings on a shared
2-core machine are noisy) and load it explicitly so the behaviour does not depend on
hypothesis' auto-detection. Locally a faster ``dev`` profile is used.
"""
import os
import sys

import pytest
from hypothesis import HealthCheck, settings

# Tests import the flat modules from the repository root, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

settings.register_profile("ci", parent=settings.get_profile("ci"), deadline=None)
settings.register_profile(
    "dev", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def kill_at(monkeypatch):
    """``arm(trainer_cls, it)`` makes ``trainer_cls.step`` raise KeyboardInterrupt at iteration
    ``it`` (the process is killed mid-run); it returns a function that disarms it."""
    def arm(trainer_cls, it):
        real_step = trainer_cls.step

        def dying_step(self, i, sample, **kw):
            if i == it:
                raise KeyboardInterrupt
            return real_step(self, i, sample, **kw)
        monkeypatch.setattr(trainer_cls, "step", dying_step)
        return lambda: monkeypatch.setattr(trainer_cls, "step", real_step)
    return arm
