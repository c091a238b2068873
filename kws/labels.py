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
