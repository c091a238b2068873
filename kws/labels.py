"""The label set of Speech Commands v0.02, which the models are trained on."""

# The 35 words in the order of the dataset's README.
WORDS = (
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow",
    "backward", "forward", "follow", "learn", "visual",
)
BACKGROUND = "_background_"  # silence and noise: the right answer when nobody speaks
LABELS = WORDS + (BACKGROUND,)

# The words the shared copy covers well (hundreds of real clips each).
WELL_COVERED = ("bed", "cat", "happy", "down", "go", "left", "right", "up", "eight", "five",
                "one", "zero", "yes", "no", "on", "off", "stop")
# The v2 benchmark's 12-class protocol: ten words, the other 25 as unknown, and silence.
CORE_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")


def threshold_problem(thresholds, labels) -> str | None:
    """What is wrong with a {word: probability} map of detection thresholds for a model with
    these labels (words only, each a probability), or None when it is fine."""
    if not isinstance(thresholds, dict):
        return f"thresholds must map words to probabilities, not {type(thresholds).__name__}"
    for word, t in thresholds.items():
        if word not in labels or word == BACKGROUND:
            return f"threshold for {word!r}, which is not one of the model's words"
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0:
            return f"threshold for {word!r} is {t!r}; thresholds are probabilities in (0, 1]"
    return None


def long_window_problem(seconds) -> str | None:
    """What is wrong with a model's long readout window (`MGRADE.long_window_s`: seconds, 0 for
    none), or None when it is fine."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0.0 <= seconds < 60.0:
        return f"long window is {seconds!r}; it is seconds in [0, 60) (0 for none)"
    return None
