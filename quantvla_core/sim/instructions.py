"""Hand-written language instructions for the MT10 tasks.

Meta-World has no language. Reach, push and pick-place share one scene, as do drawer-open/close
and window-open/close, so the instruction is what tells the policy which task to do. Each task
has several paraphrases so a policy cannot key on one exact string. Colours named here are the
colours actually rendered (goal markers: reach red, push green, pick-place blue).
"""

from __future__ import annotations

INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "reach-v3": (
        "reach the red goal marker",
        "move the gripper to the red dot",
        "put your hand on the red target",
        "bring the gripper to the red point",
    ),
    "push-v3": (
        "push the puck to the green goal",
        "slide the puck onto the green marker",
        "push the small cylinder over to the green dot",
        "shove the puck to the green target",
    ),
    "pick-place-v3": (
        "pick up the puck and place it at the blue goal",
        "grasp the puck and put it on the blue marker",
        "lift the puck and carry it to the blue dot",
        "pick the puck up and drop it off at the blue target",
    ),
    "door-open-v3": (
        "open the door",
        "pull the door of the safe open",
        "swing the door open by its handle",
        "open the black box's door",
    ),
    "drawer-open-v3": (
        "open the drawer",
        "pull the drawer out",
        "slide the green drawer open",
        "pull the drawer handle to open it",
    ),
    "drawer-close-v3": (
        "close the drawer",
        "push the drawer shut",
        "slide the green drawer closed",
        "push the drawer back in",
    ),
    "button-press-topdown-v3": (
        "press the button from the top",
        "push the red button down",
        "press down on the red button",
        "hit the button from above",
    ),
    "peg-insert-side-v3": (
        "insert the peg into the hole from the side",
        "put the green peg into the hole of the red box",
        "slide the peg sideways into the hole",
        "push the peg into the side hole",
    ),
    "window-open-v3": (
        "open the window",
        "slide the window open",
        "push the window sash open",
        "open the sliding window",
    ),
    "window-close-v3": (
        "close the window",
        "slide the window shut",
        "push the window sash closed",
        "close the sliding window",
    ),
}


def instruction_for(task: str, variant: int) -> str:
    """The `variant`-th paraphrase of `task` (wraps around), so any integer is valid."""
    if task not in INSTRUCTIONS:
        raise ValueError(f"unknown task {task!r}; accepted: {', '.join(INSTRUCTIONS)}")
    options = INSTRUCTIONS[task]
    return options[int(variant) % len(options)]
