"""Shared test configuration: Hypothesis profiles chosen by ``HYPOTHESIS_PROFILE``.

* ``dev`` (default): quick, for the edit-test loop;
* ``ci``: what CI runs (more examples, no deadline: the CI machine is shared and noisy);
* ``thorough``: many examples, for before a release or after touching a kernel.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("ci", max_examples=60, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
