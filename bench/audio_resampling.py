"""What resampling one second of stereo sound to 48 kHz costs at common and awkward rates
(``encoders/audio_vae.resample``), against scipy's polyphase filter at the exact reduced ratio.

    python bench/audio_resampling.py [--repeats 3] [--rates 44100 767999]

Median wall seconds of the repeats; peak is tracemalloc's (numpy's buffers) in one call.
"""

from __future__ import annotations

import math
import tracemalloc
from functools import partial

import numpy as np
import torch
from harness import median_seconds, repeats_parser

from megatron_cosmos3.encoders.audio_vae import SAMPLE_RATE, polyphase_factors, resample

RATES = [44_100, 96_000, 47_999, 44_056, 527_996, 767_999]


def measure(fn, repeats: int) -> tuple[float, float]:
    """(median seconds, peak MiB of one call)."""
    seconds = median_seconds(fn, torch.device("cpu"), 0, repeats)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak / 2**20


def main() -> None:
    parser = repeats_parser(__doc__)
    parser.add_argument("--rates", type=int, nargs="+", default=RATES, help="source rates, Hz")
    args = parser.parse_args()
    from scipy.signal import resample_poly

    print("| rate Hz | up/down used | exact up/down | ours s | ours MiB | exact s | exact MiB |")
    print("|---|---|---|---|---|---|---|")
    for rate in args.rates:
        sound = np.random.default_rng(0).uniform(-1, 1, (2, rate))
        up, down = polyphase_factors(rate, SAMPLE_RATE)
        g = math.gcd(rate, SAMPLE_RATE)
        ours = measure(partial(resample, torch.from_numpy(sound), rate, SAMPLE_RATE), args.repeats)
        exact = measure(partial(resample_poly, sound, SAMPLE_RATE // g, rate // g, axis=-1), args.repeats)
        print(
            f"| {rate} | {up}/{down} | {SAMPLE_RATE // g}/{rate // g} | {ours[0]:.3f} | {ours[1]:.0f} "
            f"| {exact[0]:.3f} | {exact[1]:.0f} |"
        )


if __name__ == "__main__":
    main()
