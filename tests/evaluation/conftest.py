from dataclasses import dataclass

import numpy as np
import pytest


@pytest.fixture(scope="session")
def world_detector():
    """A detector for the world's balls: its palette, 1 m box, smallest radius, effector colours."""
    from megatron_cosmos3.evaluation.detection import BallDetector
    from megatron_cosmos3.world.render import BALL_COLOURS, EMBODIMENT_COLOURS

    return BallDetector(BALL_COLOURS, box_m=1.0, min_radius_m=0.05, distractors=list(EMBODIMENT_COLOURS.values()))


@dataclass(frozen=True)
class WorldClip:
    """Balls simulated and rendered by the generated world, with their truth: frames (T, H, W, 3),
    ball centres (T, B, 2) in metres at the frame times, the collision events and the 48 kHz audio."""

    colours: list[str]
    frames: np.ndarray
    centres: np.ndarray
    event_times: np.ndarray
    audio: np.ndarray
    fps: float


def world_clip(seed: int, colours: list[str], duration_s: float = 1.0, fps: float = 16.0, size: int = 64) -> WorldClip:
    """A clip of ``colours`` balls falling and bouncing in the box, no agent (cheap to simulate)."""
    from megatron_cosmos3.world.physics import simulate
    from megatron_cosmos3.world.render import BALL_COLOURS, Canvas, Disc
    from megatron_cosmos3.world.sound import synthesize

    rng = np.random.default_rng(seed)
    count = len(colours)
    radii = rng.uniform(0.06, 0.09, count)
    # Spread along x so that no two balls start overlapping.
    x = (np.arange(count) + 0.5) / count + rng.uniform(-0.05, 0.05, count)
    positions = np.stack([x, rng.uniform(0.5, 0.85, count)], axis=-1)
    sim = simulate(positions, rng.uniform(-1.5, 1.5, (count, 2)), radii, duration_s)
    canvas = Canvas(size)
    times = np.arange(int(round(duration_s * fps)) + 1) / fps
    centres = np.stack([sim.at(t) for t in times])
    frames = np.stack(
        [canvas.draw([Disc(*c, r, BALL_COLOURS[n]) for c, r, n in zip(frame, radii, colours)]) for frame in centres]
    )
    audio = synthesize(sim.events, radii, duration_s, rng)
    return WorldClip(colours, frames, centres, np.array([e.time for e in sim.events]), audio, fps)


@pytest.fixture(scope="session")
def world_clips() -> list[WorldClip]:
    """Three 1 s clips of one, two and three balls at 64x64 pixels and 16 fps."""
    return [world_clip(1, ["red"]), world_clip(2, ["blue", "yellow"]), world_clip(3, ["green", "red", "blue"])]
