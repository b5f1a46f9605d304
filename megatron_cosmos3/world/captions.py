"""Text about a generated sample, derived from what the simulation did: captions, instructions,
questions with their answers."""

from __future__ import annotations

import numpy as np

from megatron_cosmos3.world.physics import Event

_NUMBERS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_EMBODIMENT_NAMES = {"single_arm": "A single-arm robot", "humanoid": "A humanoid", "planar_pusher": "A planar pusher"}


def number(n: int) -> str:
    return _NUMBERS[n] if n < len(_NUMBERS) else str(n)


def times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{number(n)} times")


def _balls(colours: list[str]) -> str:
    if len(colours) == 1:
        return f"A {colours[0]} ball"
    return f"{number(len(colours)).capitalize()} balls ({', '.join(colours[:-1])} and {colours[-1]})"


def floor_hits(events: list[Event], ball: int) -> int:
    return sum(e.kind == "floor" and e.ball == ball for e in events)


def clip_caption(colours: list[str], events: list[Event], embodiment: str | None, fps: float, duration_s: float) -> str:
    """What happens in a clip: the balls, their floor bounces, collisions and the agent's hits."""
    verb = "bounces" if len(colours) == 1 else "bounce"
    parts = [f"{_balls(colours)} {verb} in a grey box for {duration_s:g} seconds, filmed at {fps:g} fps."]
    for ball, colour in enumerate(colours):
        hits = floor_hits(events, ball)
        if hits:
            parts.append(f"The {colour} ball hits the floor {times(hits)}.")
    collisions = sum(e.kind == "ball" for e in events)
    if collisions:
        parts.append(f"The balls collide {times(collisions)}.")
    if embodiment is not None:
        hits = [sum(e.kind == "effector" and e.ball == ball for e in events) for ball in range(len(colours))]
        struck = [f"the {colour} ball {times(n)}" for colour, n in zip(colours, hits) if n]
        parts.append(
            f"{_EMBODIMENT_NAMES[embodiment]} hits {' and '.join(struck)}."
            if struck
            else f"{_EMBODIMENT_NAMES[embodiment]} moves but touches no ball."
        )
    return " ".join(parts)


def task_caption(embodiment: str, instruction: str, success: bool) -> str:
    """What an expert demonstration shows: the embodiment doing (or attempting) the instruction."""
    goal = instruction[0].lower() + instruction[1:]
    verb = "does as told" if success else "tries but does not finish in time"
    return f"{_EMBODIMENT_NAMES[embodiment]} {verb}: {goal}"


def _where(x: float, z: float) -> str:
    side = "on the left" if x < 1 / 3 else "on the right" if x > 2 / 3 else "in the middle"
    height = "near the floor" if z < 1 / 3 else "near the top" if z > 2 / 3 else "halfway up"
    return f"{height} {side}"


def still_caption(colours: list[str], centres: np.ndarray) -> str:
    """Where each ball is in a still picture."""
    places = [f"the {colour} ball is {_where(*centre)}" for colour, centre in zip(colours, centres)]
    return f"{_balls(colours)} in a grey box; {'; '.join(places)}."


def instruction(embodiment: str, start: np.ndarray, end: np.ndarray, opening: tuple[float, float]) -> str:
    """An instruction matching the motion: where the (first) hand goes and whether it opens or closes."""
    dx, dz = end - start
    horizontal = "right" if dx > 0 else "left"
    vertical = "up" if dz > 0 else "down"
    grip = "opening" if opening[1] > opening[0] else "closing"
    if embodiment == "single_arm":
        return f"Move the gripper {horizontal} and {vertical}, {grip} it, and push any ball in the way."
    if embodiment == "planar_pusher":
        reach = "extending" if opening[1] > opening[0] else "retracting"
        return f"Move the pusher {horizontal} and {vertical}, {reach} it, and push any ball in the way."
    return f"Walk and move the hands {horizontal} and {vertical}, {grip} them, and push any ball in the way."


def floor_question(colours: list[str], events: list[Event], rng: np.random.Generator) -> tuple[str, str]:
    """A counting question about the clip and its answer."""
    ball = int(rng.integers(len(colours)))
    answer = number(floor_hits(events, ball)).capitalize() + "."
    return f"How many times does the {colours[ball]} ball hit the floor?", answer
