"""The chunked SSD scan and the one-step decode equal the plain recurrence."""

import mlx.core as mx
import numpy as np
import pytest

from granite_mlx import ssm


def random_inputs(b, l, h, p, g, n, seed=0, dt_scale=1.0):
    mx.random.seed(seed)
    x = mx.random.normal((b, l, h, p))
    dt = ssm.discretize_dt(dt_scale * mx.random.normal((b, l, h)), mx.zeros((h,)), (0.0, float("inf")))
    A = -mx.exp(mx.random.normal((h,)))
    B = mx.random.normal((b, l, g, n))
    C = mx.random.normal((b, l, g, n))
    D = mx.random.normal((h,))
    state = mx.random.normal((b, h, p, n))
    return x, dt, A, B, C, D, state


def close(a, b, tol=1e-5):
    return (mx.abs(a - b).max() / (mx.abs(b).max() + 1e-12)).item() < tol


@pytest.mark.parametrize("l", [1, 2, 7, 16, 17, 31, 64, 100])
@pytest.mark.parametrize("chunk", [4, 16, 32])
@pytest.mark.parametrize("g", [1, 2])
def test_chunked_equals_sequential(l, chunk, g):
    x, dt, A, B, C, D, s0 = random_inputs(2, l, 4, 8, g, 16, seed=l * 7 + chunk + g)
    for init in (None, s0):
        y1, f1 = ssm.ssd_chunked_scan(x, dt, A, B, C, D, chunk, init)
        y2, f2 = ssm.sequential_scan(x, dt, A, B, C, D, init)
        assert close(y1, y2) and close(f1, f2)


def test_long_decay_stays_accurate():
    """Strong decay inside a chunk: the stable segment sum keeps full precision."""
    x, dt, A, B, C, D, s0 = random_inputs(1, 256, 2, 4, 1, 8, seed=3, dt_scale=4.0)
    y1, f1 = ssm.ssd_chunked_scan(x, dt, A * 8, B, C, D, 256, s0)
    y2, f2 = ssm.sequential_scan(x, dt, A * 8, B, C, D, s0)
    assert close(y1, y2, 1e-4) and close(f1, f2, 1e-4)


def float64_scan(x, dt, A, B, C, D):
    """The recurrence in float64 numpy, from a zero state: the ground truth."""
    x, dt, A, B, C, D = (np.array(t).astype(np.float64) for t in (x, dt, A, B, C, D))
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    S, ys = np.zeros((b, h, p, n)), []
    for t in range(l):
        Bh, Ch = np.repeat(B[:, t], h // g, axis=1), np.repeat(C[:, t], h // g, axis=1)
        decay = np.exp(dt[:, t] * A)[..., None, None]  # (b,h,1,1)
        S = S * decay + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, :, None]  # (b,h,p,n)
        ys.append(np.einsum("bhpn,bhn->bhp", S, Ch) + D[:, None] * x[:, t])
    return np.stack(ys, 1), S


@pytest.mark.parametrize("seed", [0, 2])
def test_strong_decay_chunk_states_are_float32_exact(seed):
    """The decay to a chunk's end comes from the segment sum's last row; as
    exp(a_cum[-1] - a_cum) it lost 4e-5 to 1e-4 relative in the carried state."""
    x, dt, A, B, C, D, _ = random_inputs(1, 256, 4, 8, 1, 16, seed=seed, dt_scale=4.0)
    y64, s64 = float64_scan(x, dt, A * 8, B, C, D)
    for chunk in (64, 256):
        y, s = ssm.ssd_chunked_scan(x, dt, A * 8, B, C, D, chunk)
        assert np.abs(np.array(s) - s64).max() / np.abs(s64).max() < 2e-6
        assert np.abs(np.array(y) - y64).max() / np.abs(y64).max() < 2e-6


def test_split_scan_carries_state():
    x, dt, A, B, C, D, _ = random_inputs(1, 50, 4, 8, 1, 16, seed=5)
    y, f = ssm.ssd_chunked_scan(x, dt, A, B, C, D, 16)
    ya, fa = ssm.ssd_chunked_scan(x[:, :23], dt[:, :23], A, B[:, :23], C[:, :23], D, 16)
    yb, fb = ssm.ssd_chunked_scan(x[:, 23:], dt[:, 23:], A, B[:, 23:], C[:, 23:], D, 16, fa)
    assert close(mx.concatenate([ya, yb], axis=1), y) and close(fb, f)


def test_decode_step_equals_prefill_conv_and_scan():
    """decode_step (conv window + recurrence) over tokens one by one equals the
    prefill path: conv over the whole window then the chunked scan."""
    mx.random.seed(11)
    b, l, h, p, g, n, k = 2, 9, 4, 8, 2, 16, 4
    ch = h * p + 2 * g * n
    xBC = mx.random.normal((b, l, ch))
    w, bias = mx.random.normal((ch, k)), mx.random.normal((ch,))
    dt_raw, dt_bias = mx.random.normal((b, l, h)), mx.random.normal((h,))
    A, D = -mx.exp(mx.random.normal((h,))), mx.random.normal((h,))
    limit = (0.0, 0.7)

    window = mx.concatenate([mx.zeros((b, k - 1, ch)), xBC], axis=1)
    conv = mx.sigmoid(c := ssm.depthwise_causal_conv(window, w, bias)) * c
    xs, Bm, Cm = mx.split(conv, [h * p, h * p + g * n], axis=-1)
    dt = ssm.discretize_dt(dt_raw, dt_bias, limit)
    y_ref, s_ref = ssm.ssd_chunked_scan(
        xs.reshape(b, l, h, p), dt, A, Bm.reshape(b, l, g, n), Cm.reshape(b, l, g, n), D, 4
    )

    conv_state, state, ys = mx.zeros((b, k - 1, ch)), mx.zeros((b, h, p, n)), []
    for t in range(l):
        y, conv_state, state = ssm.decode_step(
            xBC[:, t], conv_state, w, bias, dt_raw[:, t], dt_bias, A, D, state, limit, g
        )
        ys.append(y)
    assert close(mx.stack(ys, axis=1), y_ref) and close(state, s_ref)
    assert close(conv_state, xBC[:, -(k - 1):])


def test_dt_clamp():
    dt = ssm.discretize_dt(mx.array([[-30.0, 0.0, 30.0]]), mx.zeros((3,)), (0.01, 1.0))
    assert dt.tolist()[0] == pytest.approx([0.01, 0.6931472, 1.0], rel=1e-6)


@pytest.mark.parametrize("l", [8, 9, 37])
def test_segmented_cpu_scan_equals_sequential(monkeypatch, l):
    """On the CPU `selective_scan` runs long inputs in evaluated segments (to bound
    memory); the state must carry across segment edges exactly."""
    monkeypatch.setattr(ssm, "CPU_SCAN_SEGMENT", 8)
    x, dt, A, B, C, D, s0 = random_inputs(1, l, 4, 8, 2, 16, seed=l)
    for init in (None, s0):
        y1, f1 = ssm.selective_scan(x, dt, A, B, C, D, 4, init)
        y2, f2 = ssm.sequential_scan(x, dt, A, B, C, D, init)
        assert y1.shape == y2.shape and close(y1, y2) and close(f1, f2)
