import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module", autouse=True)
def frozen_heap() -> Iterator[None]:
    """Leave the objects alive before each module's tests out of garbage collection.

    Accelerate runs ``gc.collect()`` at the start of every training run; with transformers
    imported, a full collection takes about a second on the test machine. The ranks of the
    distributed tests are forked with it frozen, so that each rank's collections scan only
    what the rank made.
    """
    gc.freeze()
    yield
    gc.unfreeze()
