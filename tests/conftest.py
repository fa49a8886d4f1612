import sys
from pathlib import Path

# tests/ holds helpers (tiny_models) imported by the test files.
sys.path.insert(0, str(Path(__file__).parent))

# Every OpenCL implementation installed (Intel's CPU runtime from pip too) is visible to
# the ICD loader only when it is pointed at them before the first platform query.
from mlc_edge.verify.devices import prepare_environment  # noqa: E402

prepare_environment()
