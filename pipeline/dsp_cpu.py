"""sox's reverb run sample by sample, compiled with numba: the CPU kernel behind ``pipeline.dsp.freeverb_filter``.

The same network as sox 14.4.2 ``src/reverb.c`` (read at chirlu/sox 42b3557): per filter array, 8
parallel combs with a one-pole low-pass in their feedback and 4 freeverb all-passes in series; the
array's output times its gain is added to the destination. sox runs this recursion in float; here
the state is float64, so the result is the exact response to float64 rounding (about 1e-12 of the
signal), which the FFT rendering on an accelerator (``pipeline.dsp.freeverb_irs``) reaches to 1e-9.

Imported lazily (numba's import and first compilation cost about a second; ``cache=True`` keeps
the compiled kernel next to this file for later processes). The kernel releases the GIL, so
examples run on several threads at once.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def wet_add(src: np.ndarray, dest: np.ndarray, combs: np.ndarray, allpasses: np.ndarray, feedback: float,
            hf_damping: float, gain: float) -> None:
    """``dest += gain * array(src)``: one sox filter array over ``src`` (T,), zero initial state.

    ``combs`` (8,) and ``allpasses`` (4,) are the delay-line lengths in samples (int64). sox steps
    all 12 filters per sample through ring buffers. Here a delay line is its filter's own history
    (what sox reads from a line of length N at sample t is what it wrote there at t - N), and the
    loops are ordered for the CPU: the 8 parallel combs advance together sample by sample (their
    one-pole low-passes are 8 independent dependency chains that overlap), then each all-pass runs
    over the whole clip (its recursion reaches back N samples, so consecutive samples overlap).
    """
    t_len, n_c = src.shape[0], combs.shape[0]
    hist = np.zeros((n_c, t_len))  # each comb's low-pass state over time
    store = np.zeros(n_c)
    acc = np.zeros(t_len)  # the sum of the combs, then the all-pass chain's signal
    for t in range(t_len):  # comb: out = line; store = out + (store - out) * damping; line <- in + store * feedback
        total = 0.0
        for i in range(n_c):
            back = t - combs[i]
            delayed = src[back] + hist[i, back] * feedback if back >= 0 else 0.0
            st = delayed + (store[i] - delayed) * hf_damping
            store[i] = st
            hist[i, t] = st
            total += delayed
        acc[t] = total
    line = np.empty(t_len)
    for m in allpasses:  # freeverb's all-pass: out = line - in; line <- in + line * 0.5
        for t in range(min(m, t_len)):
            line[t] = acc[t]
            acc[t] = -acc[t]
        for t in range(m, t_len):
            delayed = line[t - m]
            line[t] = acc[t] + delayed * 0.5
            acc[t] = delayed - acc[t]
    for t in range(t_len):
        dest[t] += acc[t] * gain
