"""Hash-derived static embeddings: deterministic, unit norm, namespaced, nearly orthogonal."""

import numpy as np

from operators.model.static import static_embeddings


def test_deterministic_and_unit_norm() -> None:
    a = static_embeddings("item", ["x", "y", "z"], 64)
    b = static_embeddings("item", ["z", "x"], 64)
    assert a.dtype == np.float32 and a.shape == (3, 64)
    np.testing.assert_array_equal(a[2], b[0])
    np.testing.assert_array_equal(a[0], b[1])
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-6)


def test_users_and_items_live_in_separate_namespaces() -> None:
    u = static_embeddings("user", ["42"], 128)
    i = static_embeddings("item", ["42"], 128)
    assert not np.array_equal(u, i)


def test_distinct_ids_are_nearly_orthogonal() -> None:
    v = static_embeddings("user", [str(k) for k in range(200)], 128)
    gram = v @ v.T
    off = gram[~np.eye(200, dtype=bool)]
    assert np.abs(off).max() < 0.5
    assert abs(off.mean()) < 0.02
