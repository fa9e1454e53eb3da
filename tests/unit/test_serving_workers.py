"""What a gateway's workers share: the route revisions each serves, and forgetting the workers that are gone."""

from __future__ import annotations

import os
import subprocess
import sys

from releasegate.serving import workers


def _gone_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_route_is_settled_once_every_live_worker_serves_it_or_failed_to_load_it():
    with workers.shared_dir() as path:
        here = workers.Siblings(path)
        other = workers.Siblings(path)
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            other.pid = sleeper.pid  # a second worker, alive
            here.announce({"churn": 3}, {})
            other.announce({"churn": 2}, {})
            assert here.settled("churn", 3) == (1, 2)
            other.announce({"churn": 3}, {})
            assert here.settled("churn", 3) == (2, 2)
            assert here.settled("churn", 2) == (2, 2)  # a newer revision settles an older one
            other.announce({"churn": 2}, {"churn": 4})
            here.announce({"churn": 4}, {})
            assert here.settled("churn", 4) == (2, 2)  # it could not load it: nothing more to wait for
            assert here.settled("other-model", 1) == (0, 2)
        finally:
            sleeper.kill()
            sleeper.wait()
        assert here.settled("churn", 4) == (1, 1)  # a worker that is gone is not waited for


def test_a_starting_worker_forgets_the_files_of_workers_that_are_gone():
    with workers.shared_dir() as path:
        gone = workers.Siblings(path)
        gone.pid = _gone_pid()
        gone.announce({"churn": 1}, {})
        (path / "metrics" / f"gauge_livesum_{gone.pid}.db").write_bytes(b"")
        (path / "metrics" / f"counter_{gone.pid}.db").write_bytes(b"")
        workers.Siblings(path).start()
        assert not (path / "routes" / f"{gone.pid}.json").exists()
        assert not (path / "metrics" / f"gauge_livesum_{gone.pid}.db").exists()
        assert (path / "metrics" / f"counter_{gone.pid}.db").exists()  # what it counted still counts
    assert not path.exists()


def test_a_workers_log_writer_does_not_inherit_the_shared_directory():
    with workers.shared_dir():
        env = workers.child_environment(dict(os.environ))
        assert os.environ[workers.METRICS_DIR]
    assert workers.RUN_DIR not in env and workers.METRICS_DIR not in env
