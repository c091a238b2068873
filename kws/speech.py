"""Speech that must not fire: sentences without any of the 35 keywords, rendered by the offline
TTS engines (espeak-ng, flite), for `kws eval-stream`'s streams and as training's negatives.

A sentence is drawn from VOCABULARY by a seed: its words, its engine, voice and speed. The
vocabulary is everyday English without the 35 words and without their homophones ("to", "for",
"know", "write", ...), which no acoustic model could tell from the keywords; near misses
("bad", "dawn", "lift", "happen") stay in, as they are what a user will say. Renders are cached
in a folder (WAV, named by a hash of what made them), so a stream is rebuilt without the engines
after the first time, and the same seed gives the same audio.

Training draws its sentences from TRAINING_VOCABULARY, which shares no word with VOCABULARY:
the speech of the evaluation streams stays words the model never heard as negatives. Its
near-miss sentences (NEAR_MISS_VOCABULARY: rhymes and near rhymes of the keywords, "john" for
"on", "hive" for "five", "gnome" for "no") share no word with either: they teach the model the
sounds a keyword must not be mistaken for, while the streams' own near misses stay unheard.
"""

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from kws.audio import SAMPLE_RATE
from kws.synth import Render, check_engine, synthesize

VOCABULARY = tuple("""
a about after again against all almost also always am among an and another any anything are
around as ask at away back bad bag bank be because been before began behind being below best
better between big black blue book both boy bring brown but buy by call came can car care carry
case change child city clean close cold come could country course cup dark day dead dear did
different doing done door dream drink drive during each early earth easy eat else end enough
even evening ever every eye face fact fall family far fast father feel few field fill find fine
fire first fish fly food foot friend from full game garden gave get girl give glad glass good
got great green ground group grow had half hand hard has have he head hear heart help her here
high him his hold home hope horse hot hour how idea if important in inside into is it its just
keep kind king knew land large last late later laugh lay lead leave less let letter life light
like line listen little live long look lot love low made make man many may me mean men might
milk mind minute miss money more morning most mother move much music must my name near need
never new next nice night noise not nothing now number often old only open or order other our
out over own page paper park part party people picture place plan plant play point poor put
question quick quite rain ran read ready real red remember rest river road rock room round run
said same sat saw say school sea second see seem sell send set she ship short should show side
simple sing sit small so some something song soon sound speak spring stand star start still
story street strong such summer sun sure table take talk tell than thank that the their them
then there these they thing think this those though thought through time today together told
took top town travel try turn under until us use very voice walk wall want warm was watch water
way we weather week well went were what when where which while white who whole why will wind
window winter with woman wonder wood word work world would year you young your
bat bet bid bud dawn dig lift loft map gone ban heaven
""".split())

TRAINING_VOCABULARY = tuple("""
ability above accept across act add afraid age ago agree air allow alone along already
although amount angry animal answer appear apple area arm army arrive art attack aunt autumn baby
bake ball band base basket bath beach bean bear beat beautiful become bell belong bench beside
bicycle bill biscuit blanket blood board boat body bone border borrow bottle bottom bowl box brain
branch bread break breakfast breath brick bridge bright broad brother brush bucket build burn bus
busy butter button cake camera camp candle cap captain card carpet castle catch cause ceiling chair
chalk cheap cheese chicken chief church circle class clever climb clock cloth cloud coat coffee coin
collect colour corner cotton cough count cousin cover cow crack cream crowd cry curtain cut daughter
deep desk dinner dish doctor dollar drawer dress dry dust ear east edge egg empty enemy engine exam
explain fail farm fat fear feather fence fever film finger flag floor flower fog fork fresh fruit
fun funny gate gift glove goat gold grass guest guitar hair hammer hat heavy hill hole holiday honey
hospital hungry hurry ice island jacket jam job joke juice jump kettle key kick kitchen knee knife
ladder lake lamp language lemon lesson library lip lock lunch machine market meat medicine meet
metal middle mirror moon mountain mouse mouth mud nail narrow neck needle nest news noon nose ocean
office oil onion orange oven pack pain paint pair pan pants path pay peace pen pencil pepper piano
pick pie pig pillow pink pipe pizza plate pocket police pool potato pull purple push rabbit radio
rice rich ring roof rope rose rubber rule salt sand sauce scarf shadow shake shape sheep shelf shirt
shoe shop shoulder silver sister skirt sky sleep slow smile smoke snake snow soap sock soft soup
space spoon square stairs stamp station steam stick stone storm string student sugar suit swim tail
tea teacher tent thick thin thumb ticket tiger toast tomato tongue tool tooth towel toy train truck
umbrella uncle valley village wait wash wheel wide wife wild wing wire wolf yard yellow
""".split())
TRAINING_SENTENCES = 1000  # about 35 minutes of speech

# Words that sound like a keyword (a rhyme, the same vowel or the same onset), grouped by it.
NEAR_MISS_VOCABULARY = tuple("""
john don swan lawn pawn con ron yawn upon anon honk bond fond pond
scoff doff toff moth froth sloth awful boss loss cost toss
pup pop hop cop sup hub tub pub
gown clown crown noun drown frown pound
theft deft chef cleft bereft lent lest
kite fight height tight bite spite ripe
yet mess guess chess yeast bless yelp
gnome note known dough toe row mow sew throw glow nope notion noble
goal ghost goad
stock stomp step crop drop plop
hero zebra nero sierra zeal
wand none nun bun gun once
tune tomb tube
free flee
pour core war
fife hive dive chive jive alive vibe thrive strive knives wives pile file
mix fix picks kicks
sever level
bait weight freight crate
mine pine dine spine wine
fed shed sled bend beg
third herd curd nerd
kit cast cab cot cart
log frog jog dock
hippie nappy sappy hobby
blouse spouse louse
marvel carving
shield feeler
vow wag
backpack
hollow swallow fellow
churn earn fern
virtual vision
""".split())
NEAR_MISS_SENTENCES = 500

# Homophones and near-homophones of the keywords, left out of the vocabulary on purpose.
KEYWORD_SOUNDS = frozenset({"to", "too", "for", "fore", "know", "won", "write", "rite", "ate",
                            "wright", "sicks", "nein"})

ENGINE_SETTINGS = {  # engine -> (voices, variants, rates): natural-sounding choices
    "espeak": (("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029"),
               ("m1", "m3", "f1", "f2", "f4"), (140, 160, 180)),
    "flite": (("kal", "kal16", "rms", "slt", "awb"), ("base",), (0.9, 1.0, 1.1)),
}
PITCHES = {"espeak": (35, 50, 65), "flite": (0.9, 1.0, 1.1)}
WORDS_PER_SENTENCE = (3, 8)  # about 1-3 s of speech
SPEECH = "_speech_"  # the label of a stream placement that holds non-keyword speech


def sentence(seed: int, vocabulary: tuple[str, ...] = VOCABULARY) -> Render:
    """The sentence of words from `vocabulary` and the way it is spoken for `seed`."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(WORDS_PER_SENTENCE[0], WORDS_PER_SENTENCE[1] + 1))
    text = " ".join(vocabulary[i] for i in rng.integers(len(vocabulary), size=n))
    engine = sorted(ENGINE_SETTINGS)[int(rng.integers(len(ENGINE_SETTINGS)))]
    voices, variants, rates = ENGINE_SETTINGS[engine]
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    return Render(engine, text, pick(voices), pick(variants), pick(rates), pick(PITCHES[engine]))


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kws" / "speech"


def sentence_path(seed: int, cache: Path, vocabulary: tuple[str, ...] = VOCABULARY) -> Path:
    """The file in `cache` that holds the audio of `sentence(seed, vocabulary)` once rendered."""
    key = hashlib.sha256(repr(sentence(seed, vocabulary)).encode()).hexdigest()[:16]
    return Path(cache) / f"{key}.wav"


def spoken(seed: int, cache: Path, vocabulary: tuple[str, ...] = VOCABULARY) -> np.ndarray:
    """Float32 16-kHz audio of `sentence(seed, vocabulary)`, leading and trailing silence
    trimmed, rendered once and then read from `cache`."""
    r = sentence(seed, vocabulary)
    path = sentence_path(seed, cache, vocabulary)
    if path.is_file():
        return sf.read(path, dtype="float32")[0]
    check_engine(r.engine)
    audio = synthesize(r).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    sf.write(tmp, audio, SAMPLE_RATE, subtype="FLOAT", format="WAV")
    os.replace(tmp, path)
    return audio


def training_sentences(cache: Path, count: int = TRAINING_SENTENCES,
                       vocabulary: tuple[str, ...] = TRAINING_VOCABULARY) -> list[np.ndarray]:
    """`count` sentences of `vocabulary` (seeds 0, 1, ...), rendered into `cache` once:
    TRAINING_VOCABULARY, or NEAR_MISS_VOCABULARY for the near-miss sentences."""
    from tqdm import tqdm
    return [spoken(seed, cache, vocabulary)
            for seed in tqdm(range(count), desc="training sentences", unit="sentence",
                             mininterval=0.5 if sys.stderr.isatty() else 30)]
