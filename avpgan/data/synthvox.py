"""SynthVox: a synthetic stand-in for VoxCeleb1 + VGGFace1, written in their on-disk layout.

Voice-to-face learning needs voices and faces that share hidden causes. Here every identity
draws hidden attributes (gender, age, body size, ancestry with a skin tone) and a three-number
`timbre` that is individual beyond those coarse attributes. The voice is synthesised from them
with a source-filter model and the face is drawn from them, so a model can only learn the
mapping through what both sides really carry:

    attribute        voice                                    face
    gender           f0, vocal-tract length, breathiness      jaw, eyes, lips, brows, hair odds
    age              f0 drift, jitter, shimmer, breath, rate  wrinkles, grey hair, sagging jaw
    size             vocal-tract length, f0                    face width/height, neck, shoulders
    ancestry/tone    accent (vowel formants, rate, melody)     skin tone, eye and hair colour
    timbre_0         vocal-tract length offset                 face length
    timbre_1         glottal open quotient (dark/bright)       jaw width
    timbre_2         nasality                                  nose width

Nuisances exist on each side alone, as in real data: per-video room and microphone, per-
utterance noise and loudness, text and melody; hair style, glasses, beard, background, pose,
lighting, expression. Utterances are 4-20 s (VoxCeleb1 has at least 4 s, mean ~8 s) with
pauses, so 4 s and 8 s crops carry different amounts of evidence.

Everything an identity writes depends only on (seed, identity index): each identity, each
utterance and each face has its own numpy SeedSequence, so the files are the same bit for bit
whatever the number of worker processes. Names and the identity split are drawn once, in the
parent, because they must be unique across identities.
"""

from __future__ import annotations

import csv
import io
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw
from scipy import signal
from tqdm import tqdm

from avpgan import atomic, seeding
from avpgan.config import DataConfig

SAMPLE_RATE = 16000
UTTERANCE_SECONDS = (4.0, 20.0)  # VoxCeleb1 keeps utterances of 4 s and longer; cut at 20 s
FACE_SIZE = 128  # written size; the shard builder derives its 64 and 128 versions from it
JPEG_QUALITY = 92
# VoxCeleb1's identity split (Nagrani et al.): 924 train, 112 val, 189 test of 1225 with faces.
SPLIT_SHARES = {"val": 112 / 1225, "test": 189 / 1225}
META_HEADER = ["VoxCeleb1 ID", "VGGFace1 ID", "Gender", "Nationality", "Set"]

# Keys of the SeedSequence spawn tree below (seed, identity index).
_KEY_ATTRS, _KEY_VIDEOS, _KEY_UTTERANCE, _KEY_FACE = 0, 1, 2, 3
_KEY_NAMES = (1 << 31) - 1  # (seed, _KEY_NAMES) is a one-element key: never an identity's


# ----------------------------------------------------------------------------------------------
# Identity attributes


@dataclass(frozen=True)
class Identity:
    """Everything that stays fixed for one speaker; one row of attributes.csv."""

    index: int
    voxceleb_id: str
    vggface_name: str
    split: str  # train | val | test under the default first-letter rule
    gender: str  # m | f
    age: float  # years
    size: float  # body size, z-score within gender
    ancestry: str
    tone: float  # skin tone, 0 dark .. 1 light
    nationality: str
    timbre_0: float  # N(0, 1): vocal-tract length offset <-> face length
    timbre_1: float  # N(0, 1): glottal open quotient <-> jaw width
    timbre_2: float  # N(0, 1): nasality <-> nose width
    # voice
    f0: float  # mean f0, Hz
    vtl: float  # vocal-tract length, cm
    open_quotient: float
    nasality: float  # 0 none .. 1 strong
    jitter: float  # relative period perturbation
    shimmer: float  # relative amplitude perturbation
    breathiness: float
    rate: float  # syllables per second
    pitch_range: float  # semitones of phrase melody
    f1_bias: float  # accent and individual vowel colour, multiplicative
    f2_bias: float
    # face geometry and colour beyond the shared attributes
    eye_spacing: float  # z-scores
    eye_size: float
    mouth_width: float
    nose_length: float
    brow_tilt: float
    skin_rgb: str  # hex colours
    hair_rgb: str
    eye_rgb: str
    hair_style: str
    beard: float  # 0 none .. 1 full
    glasses_p: float  # chance that a given photo shows glasses
    glasses_rgb: str


_ANCESTRY = {
    # name: (share, skin tone mean, nationalities, F1 bias, F2 bias, rate bias, melody bias)
    "european": (0.55, 0.84, ["USA", "UK", "Canada", "Australia", "Ireland", "Germany", "France",
                              "Italy", "Spain", "Sweden", "Norway", "Russia", "Poland", "Netherlands"],
                 1.00, 1.00, 0.0, 0.0),
    "african": (0.12, 0.16, ["USA", "Nigeria", "Ghana", "Kenya", "South Africa", "Jamaica", "UK"],
                1.30, 0.76, -0.6, 2.0),
    "latin": (0.10, 0.58, ["Mexico", "Brazil", "Argentina", "Colombia", "Chile", "Spain", "USA"],
              1.20, 1.25, 1.5, 1.4),
    "east_asian": (0.08, 0.70, ["China", "Japan", "South Korea", "Philippines", "USA"],
                   0.76, 1.30, 0.9, -1.4),
    "south_asian": (0.08, 0.40, ["India", "Pakistan", "Sri Lanka", "Bangladesh", "UK"],
                    0.85, 1.40, 1.2, 0.7),
    "middle_eastern": (0.07, 0.60, ["Iran", "Turkey", "Egypt", "Lebanon", "Israel"],
                       1.15, 0.80, 0.4, -0.7),
}
_HAIR_COLOURS = {  # name: (rgb, share among Europeans, share among others)
    "black": ((28, 22, 20), 0.15, 0.80),
    "dark_brown": ((62, 42, 30), 0.30, 0.17),
    "brown": ((105, 72, 45), 0.25, 0.03),
    "blond": ((200, 168, 108), 0.22, 0.0),
    "red": ((150, 68, 36), 0.08, 0.0),
}
_EYE_COLOURS = [(70, 45, 25), (40, 28, 20), (70, 110, 150), (80, 110, 70), (110, 115, 120)]
_HAIR_STYLES = {"m": {"short": 0.55, "long": 0.07, "receding": 0.20, "curly": 0.15, "bun": 0.03},
                "f": {"short": 0.15, "long": 0.58, "receding": 0.0, "curly": 0.14, "bun": 0.13}}

# Peterson & Barney's adult male vowel formants (F1, F2, F3), scaled per speaker below.
_VOWELS = np.array([[270, 2290, 3010], [390, 1990, 2550], [530, 1840, 2480], [660, 1720, 2410],
                    [730, 1090, 2440], [570, 840, 2410], [440, 1020, 2240], [300, 870, 2240],
                    [640, 1190, 2390], [490, 1350, 1690]], dtype=np.float64)
_REF_VTL = 17.0  # cm; the vocal-tract length those formants belong to
_BANDWIDTHS = np.array([60.0, 90.0, 120.0, 160.0, 220.0])


def _hex(rgb) -> str:
    return "#%02x%02x%02x" % tuple(int(np.clip(round(c), 0, 255)) for c in rgb)


def _rgb(text: str) -> np.ndarray:
    return np.array([int(text[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.float64)


def _rng(seed: int, *key: int) -> np.random.Generator:
    """Node `key` of the spawn tree under `seed` (see the _KEY_* constants)."""
    return seeding.rng(seed, spawn_key=key)


def draw_identity(seed: int, index: int) -> Identity:
    """The hidden attributes of identity `index`; name, id and split are filled in later."""
    rng = _rng(seed, index, _KEY_ATTRS)
    gender = "m" if rng.random() < 0.55 else "f"  # VoxCeleb1 is 55% male
    male = gender == "m"
    age = 19.0 + 58.0 * rng.beta(1.6, 2.0)
    size = float(np.clip(rng.standard_normal(), -2.5, 2.5))
    names = list(_ANCESTRY)
    ancestry = names[rng.choice(len(names), p=[_ANCESTRY[a][0] for a in names])]
    _, tone_mean, nations, f1b, f2b, rate_b, melody_b = _ANCESTRY[ancestry]
    tone = float(np.clip(tone_mean + 0.07 * rng.standard_normal(), 0.03, 0.97))
    nationality = nations[rng.integers(len(nations))]
    t0, t1, t2 = (float(v) for v in np.clip(rng.standard_normal(3), -2.5, 2.5))

    # Voice. Male f0 rises a little in old age, female f0 falls after menopause.
    age_f0 = 0.004 * max(age - 50, 0) if male else -0.005 * max(age - 40, 0)
    f0 = (118.0 if male else 210.0) * math.exp(age_f0 - 0.035 * size + 0.08 * rng.standard_normal())
    vtl = (17.0 if male else 14.8) + 0.45 * size + 0.35 * t0 + 0.01 * (age - 35)
    ageing = max(age - 20, 0) / 55  # 0 at 20, 1 at 75
    open_q = float(np.clip((0.58 if male else 0.68) + 0.05 * t1 + 0.04 * ageing, 0.4, 0.85))
    nasality = 1 / (1 + math.exp(-1.3 * t2))
    jitter = 0.004 + 0.014 * ageing + 0.002 * abs(rng.standard_normal())
    shimmer = 0.03 + 0.09 * ageing + 0.01 * abs(rng.standard_normal())
    breath = float(np.clip(0.08 + 0.25 * ageing + (0.12 if not male else 0) + 0.04 * rng.standard_normal(), 0.02, 0.6))
    rate = float(np.clip(5.0 + rate_b - 0.8 * ageing + 0.4 * rng.standard_normal(), 3.0, 7.5))
    pitch_range = float(np.clip(4.0 + melody_b + (1.0 if not male else 0) + 0.8 * rng.standard_normal(), 1.5, 9))
    f1_bias = f1b * math.exp(0.03 * rng.standard_normal())
    f2_bias = f2b * math.exp(0.03 * rng.standard_normal())

    # Face nuisances that stay with the person (hair, beard, glasses wearer, colours).
    european = ancestry == "european"
    hair_names = list(_HAIR_COLOURS)
    shares = np.array([_HAIR_COLOURS[h][1 if european else 2] for h in hair_names])
    hair = np.array(_HAIR_COLOURS[hair_names[rng.choice(len(hair_names), p=shares / shares.sum())]][0], float)
    grey = float(np.clip((age - 32 + 8 * rng.standard_normal()) / 38, 0, 1))
    hair = (1 - 0.85 * grey) * hair + 0.85 * grey * np.array([195.0, 195, 198])
    eye = _EYE_COLOURS[rng.integers(len(_EYE_COLOURS))] if european else _EYE_COLOURS[rng.integers(2)]
    light, dark = np.array([242.0, 210, 188]), np.array([58.0, 38, 28])
    skin = dark + (light - dark) * tone + 5 * rng.standard_normal(3)
    styles = dict(_HAIR_STYLES[gender])
    if male:  # receding hairlines grow with age
        styles["receding"] *= 0.3 + 2.5 * ageing
    keys = list(styles)
    p = np.array([styles[k] for k in keys])
    hair_style = keys[rng.choice(len(keys), p=p / p.sum())]
    beard = float(rng.uniform(0.3, 1.0)) if male and rng.random() < 0.35 else 0.0
    glasses_p = 0.75 if rng.random() < 0.12 + 0.25 * ageing else 0.04
    glasses = [(25, 25, 30), (110, 70, 40), (160, 160, 170), (120, 20, 30)][rng.integers(4)]

    return Identity(
        index=index, voxceleb_id="", vggface_name="", split="", gender=gender, age=round(age, 2),
        size=round(size, 4), ancestry=ancestry, tone=round(tone, 4), nationality=nationality,
        timbre_0=round(t0, 4), timbre_1=round(t1, 4), timbre_2=round(t2, 4),
        f0=round(f0, 3), vtl=round(vtl, 4), open_quotient=round(open_q, 4), nasality=round(nasality, 4),
        jitter=round(jitter, 5), shimmer=round(shimmer, 5), breathiness=round(breath, 4),
        rate=round(rate, 3), pitch_range=round(pitch_range, 3), f1_bias=round(f1_bias, 4),
        f2_bias=round(f2_bias, 4),
        eye_spacing=round(float(rng.standard_normal()), 4), eye_size=round(float(rng.standard_normal()), 4),
        mouth_width=round(float(rng.standard_normal()), 4), nose_length=round(float(rng.standard_normal()), 4),
        brow_tilt=round(float(rng.standard_normal()), 4),
        skin_rgb=_hex(skin), hair_rgb=_hex(hair), eye_rgb=_hex(eye), hair_style=hair_style,
        beard=round(beard, 3), glasses_p=glasses_p, glasses_rgb=_hex(glasses),
    )


# ----------------------------------------------------------------------------------------------
# Names, ids and the split

_FIRST = {
    "m": "Aaron Adam Adrian Ahmed Alan Albert Alec Andre Andrew Anthony Arjun Arthur Ashton Ben Benedict "
         "Bill Blake Brad Brandon Brian Bruce Bruno Bryan Caleb Cameron Carl Carlos Chad Charles Chris "
         "Christian Clint Colin Connor Craig Dan Daniel Danny Darren David Dean Derek Dev Diego Dominic "
         "Donald Dustin Eddie Edgar Edward Elijah Elliot Emilio Eric Ethan Evan Ewan Ezra Felix Fernando "
         "Finn Frank Fred Gabriel Gary George Gerard Glenn Greg Harrison Harry Hassan Henry Hugh Ian Idris "
         "Isaac Ivan Jack Jake James Jason Javier John Jonah Joseph Jude Kai Karl Kenji Kevin Kieran Lars "
         "Leon Liam Louis Luca Luke Malik Marco Mark Matt Max Michael Miguel Nathan Neil Nick Noah Oliver "
         "Omar Oscar Owen Pablo Patrick Paul Pedro Peter Quentin Quincy Rahul Ravi Ray Richard Robert Ryan "
         "Sam Samuel Sean Sergio Simon Steve Tariq Theo Thomas Tom Tyler Umar Uriel Victor Vikram Vincent "
         "Wade Walter Will Wyatt Xavier Yusuf Yuri Zach Zane".split(),
    "f": "Abigail Ada Aisha Alice Alicia Amanda Amber Amy Ana Angela Anna Anya Ava Barbara Beatrice Bella "
         "Beth Bianca Blair Bonnie Brenda Brie Brooke Camila Carla Caroline Carmen Cate Charlotte Chloe "
         "Claire Clara Cynthia Daisy Dakota Dana Daniela Deborah Diana Diane Dina Dolores Donna Eden Eileen "
         "Elena Eliza Ella Ellen Emily Emma Erin Eva Evelyn Fatima Felicity Fiona Frances Freya Gabrielle "
         "Gemma Gina Grace Greta Hana Hannah Heather Helen Holly Ines Ingrid Iris Isabel Ivy Jade Jane "
         "Jennifer Jessica Julia Julie Kate Keira Kerry Kim Kira Laura Leila Lily Linda Lucy Maria Maya "
         "Megan Mia Mila Miranda Nadia Naomi Natalie Nina Nora Olga Olive Olivia Paula Penelope Petra Priya "
         "Queenie Rachel Rebecca Rita Rosa Ruby Sally Sara Scarlett Sofia Sophie Tara Tessa Tina Tracy Uma "
         "Ursula Vanessa Vera Viola Wanda Wendy Willa Xena Yara Yasmin Yoko Zara Zoe".split(),
}
_LAST = ("Abbott Adeyemi Alvarez Andersen Bailey Banerjee Barnes Becker Berg Bianchi Boateng Brooks Byrne "
         "Campbell Carter Castro Chen Chowdhury Clarke Cohen Costa Cruz Dahl Demir Dubois Duncan Edwards "
         "Ellis Evans Farah Fernando Ferreira Fischer Fleming Flores Foster Garcia Gill Gomez Grant Greco "
         "Gupta Haddad Hall Hansen Hayes Herrera Hughes Ibrahim Ito Jensen Johnson Jones Kapoor Kato Keller "
         "Kelly Khan Kim Kowalski Larsen Lee Lindqvist Lopez Lynch Martin Mendoza Mensah Meyer Moreau "
         "Moretti Morris Murphy Nakamura Nasser Nguyen Novak Nwosu Okafor Olsen Ortiz Park Patel Perez "
         "Petrov Price Quinn Ramos Reddy Reed Reyes Richter Rojas Romano Rossi Russo Santos Sato Schmidt "
         "Sharma Silva Singh Smith Sokolov Suzuki Tanaka Taylor Torres Turner Vargas Walsh Wang Watson "
         "Weber Wong Yamamoto Yilmaz Young Zhang Ziegler").split()


def split_counts(n: int) -> dict[str, int]:
    """How many identities each split gets: VoxCeleb1's proportions, at least one each."""
    if n < 3:
        raise ValueError(f"synthvox: {n} identities cannot fill train, val and test; use at least 3 (12+ advised)")
    val = max(1, round(n * SPLIT_SHARES["val"]))
    test = max(1, round(n * SPLIT_SHARES["test"]))
    return {"train": n - val - test, "val": val, "test": test}


def _split_letters() -> dict[str, str]:
    """First letters per split under the data config's default rule (A-B val, C-E test)."""
    d = DataConfig()
    val, test = d.val_prefixes.upper(), d.test_prefixes.upper()
    train = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in val + test)
    return {"val": val, "test": test, "train": train}


def draw_identities(n: int, seed: int) -> list[Identity]:
    """All identities with unique VGGFace-style names, ids and splits.

    The split is chosen first (a seeded shuffle of the identities into VoxCeleb1's shares)
    and the first name's initial is then drawn from that split's letters, so that the
    first-letter rule of the loaders reproduces exactly this split. VoxCeleb1's ids follow
    the alphabetical order of the names, and so do these.
    """
    counts = split_counts(n)
    idents = [draw_identity(seed, i) for i in range(n)]
    rng = _rng(seed, _KEY_NAMES)
    order = rng.permutation(n)
    split_of = np.empty(n, dtype=object)
    split_of[order[: counts["val"]]] = "val"
    split_of[order[counts["val"]: counts["val"] + counts["test"]]] = "test"
    split_of[order[counts["val"] + counts["test"]:]] = "train"
    letters = _split_letters()
    taken: set[str] = set()
    named = []
    for ident in idents:
        pool = [f for f in _FIRST[ident.gender] if f[0].upper() in letters[split_of[ident.index]]]
        if not pool:
            raise ValueError(f"synthvox: no first names start with {letters[split_of[ident.index]]}")
        for attempt in range(1000):
            name = f"{pool[rng.integers(len(pool))]}_{_LAST[rng.integers(len(_LAST))]}"
            if attempt >= 20:  # crowded: add a middle initial as in "Michael_J._Fox"
                first, last = name.split("_")
                name = f"{first}_{chr(65 + rng.integers(26))}._{last}"
            if attempt >= 200:
                name = f"{name}_{attempt}"
            if name not in taken:
                break
        taken.add(name)
        named.append(replace(ident, vggface_name=name, split=str(split_of[ident.index])))
    by_name = sorted(named, key=lambda i: i.vggface_name)
    ids = {ident.index: f"id{10001 + rank:05d}" for rank, ident in enumerate(by_name)}
    return [replace(i, voxceleb_id=ids[i.index]) for i in named]


def _video_plan(seed: int, index: int, utterances: int) -> list[tuple[str, int]]:
    """(11-character video id, utterance count) per video, like VoxCeleb1's YouTube folders."""
    rng = _rng(seed, index, _KEY_VIDEOS)
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))
    per_video = rng.uniform(1.5, 8.0)  # speakers differ in how many clips each video gives
    plan, left = [], utterances
    while left > 0:
        k = int(min(left, 1 + rng.poisson(per_video - 1)))
        plan.append(("".join(rng.choice(alphabet, 11)), k))
        left -= k
    return plan


# ----------------------------------------------------------------------------------------------
# Voices


def utterance_seconds(rng: np.random.Generator, seconds: tuple[float, float]) -> float:
    """A long-tailed length like VoxCeleb1's: most near the minimum, mean ~8 s for 4-20 s."""
    lo, hi = seconds
    return float(min(lo + rng.exponential(0.27 * (hi - lo)), hi))


def _plan_speech(ident: Identity, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Phrases of syllables (optional consonant + vowel) separated by pauses, as time tables."""
    sr = SAMPLE_RATE
    t = rng.uniform(0.1, 0.5)
    end = n / sr - rng.uniform(0.1, 0.4)
    vow = []  # (start, end, amp, vowel)
    fric = []  # (start, end, amp, band)
    pitch = []  # (time, semitones)
    while t < end - 0.3:
        n_syl = int(rng.integers(3, 15))
        rate = ident.rate * math.exp(0.12 * rng.standard_normal())
        question = rng.random() < 0.15
        for j in range(n_syl):
            dur = math.exp(0.25 * rng.standard_normal()) / rate
            if t + dur > end:
                break
            kind = rng.choice(4, p=[0.25, 0.35, 0.25, 0.15])  # none, fricative, plosive, voiced fricative
            v0 = t
            if kind:
                c = dur * rng.uniform(0.25, 0.4)
                band = int(rng.integers(3))
                if kind == 1:
                    fric.append((t, t + c, rng.uniform(0.12, 0.35), band))
                elif kind == 2:  # closure, then a short broadband burst
                    fric.append((t + 0.7 * c, t + 0.7 * c + 0.015, rng.uniform(0.3, 0.6), 2))
                else:
                    fric.append((t, t + c, rng.uniform(0.05, 0.15), band))
                    vow.append((t, t + c - 0.002, 0.25, -1))
                v0 = t + c
            stressed = rng.random() < 0.3
            vow.append((v0, t + dur - 0.002, 1.0 if stressed else rng.uniform(0.5, 0.85),
                        int(rng.integers(len(_VOWELS)))))
            pos = j / max(n_syl - 1, 1)
            st = ident.pitch_range * (0.5 - pos) + 0.4 * rng.standard_normal()
            st += 0.6 * ident.pitch_range * stressed
            if question and j == n_syl - 1:
                st += 1.2 * ident.pitch_range
            pitch.append(((v0 + t + dur) / 2, st))
            t += dur
        t += rng.uniform(0.15, 0.8)
    if not vow:  # never an empty utterance, even for odd lengths
        vow.append((t, min(t + 0.25, n / sr), 1.0, 0))
        pitch.append((t + 0.1, 0.0))
    return {"vowels": np.array(vow, dtype=np.float64), "fric": np.array(fric, dtype=np.float64).reshape(-1, 4),
            "pitch": np.array(pitch, dtype=np.float64)}


def _envelope(segments: np.ndarray, n: int, ramp: float = 0.02) -> np.ndarray:
    """Piecewise-linear amplitude over samples: rise, hold `amp`, fall for each segment."""
    if len(segments) == 0:
        return np.zeros(n)
    s, e, a = segments[:, 0], segments[:, 1], segments[:, 2]
    r = np.minimum(ramp, (e - s) / 3)
    x = np.stack([s, s + r, e - r, e], 1).ravel() * SAMPLE_RATE
    y = np.stack([0 * a, a, a, 0 * a], 1).ravel()
    return np.interp(np.arange(n), x, y, left=0.0, right=0.0)


def _glottal_source(f0: np.ndarray, ident: Identity, rng: np.random.Generator) -> np.ndarray:
    """Rosenberg glottal-flow derivative with jitter, shimmer and breath noise, per sample."""
    sr = SAMPLE_RATE
    phase0 = np.cumsum(f0) / sr
    z = rng.standard_normal(int(phase0[-1]) + 2)
    f0j = f0 * (1.0 + ident.jitter * z[phase0.astype(np.int64)])  # one perturbation per period
    phase = np.cumsum(f0j) / sr
    k = phase.astype(np.int64)
    frac = phase - k
    oq = ident.open_quotient
    tp, tn = 0.62 * oq, 0.38 * oq  # opening and closing shares of the period
    flow = np.where(frac < tp, 0.5 * (1 - np.cos(np.pi * frac / tp)),
                    np.where(frac < oq, np.cos(0.5 * np.pi * (frac - tp) / tn), 0.0))
    flow *= np.maximum(1.0 + ident.shimmer * rng.standard_normal(k[-1] + 2)[k], 0.2)
    # The derivative also stands for lip radiation; scaling by the period keeps loudness
    # independent of pitch.
    src = np.diff(flow, prepend=0.0) * (sr / f0j)
    return src + ident.breathiness * (0.4 + flow) * rng.standard_normal(len(f0))


def _vocal_tract(x: np.ndarray, times: np.ndarray, targets: np.ndarray, bandwidths: np.ndarray,
                 nasality: float) -> np.ndarray:
    """Time-varying all-pole filtering done frame by frame in the frequency domain.

    Each 32 ms frame (8 ms hop) is multiplied by the response of that frame's formant
    resonators; zero-padding to twice the frame keeps the filtering linear, and Hann windows
    at a quarter-frame hop add back to a constant. One batched FFT replaces a per-sample
    loop over changing filter coefficients. `targets` [K, P] are formant frequencies at
    `times` [P] (seconds), joined linearly.
    """
    sr, win_len, hop, nfft = SAMPLE_RATE, 512, 128, 1024
    n = len(x)
    pad = np.concatenate([np.zeros(win_len), x, np.zeros(win_len)])
    frames = np.lib.stride_tricks.sliding_window_view(pad, win_len)[::hop]
    spec = np.fft.rfft(frames * np.hanning(win_len + 1)[:-1], nfft)  # [T, F]
    centres = (np.arange(len(frames)) * hop - win_len / 2) / sr
    formants = np.minimum([np.interp(centres, times, f) for f in targets], 0.46 * sr)

    # Each frame's filter as polynomials in z^-1: the denominator multiplies one
    # (1 - c z^-1 + r^2 z^-2) per resonator, and an FFT of the coefficients gives the whole
    # response at once. A nasal pole-zero pair is added whose zero moves away from its pole
    # as nasality grows (equal pole and zero cancel).
    poles = [(f, bw) for f, bw in zip(formants, bandwidths)]
    zeros = []
    if nasality > 0.02:
        poles.append((np.full(len(frames), 270.0), 100.0))
        zeros.append((np.full(len(frames), 270.0 * (1 + 0.9 * nasality)), 120.0))

    def polynomial(pairs: list) -> np.ndarray:
        poly = np.zeros((len(frames), 2 * len(pairs) + 1))
        poly[:, 0] = 1.0
        for j, (freq, bw) in enumerate(pairs):
            r = math.exp(-math.pi * bw / sr)
            c = (2 * r * np.cos(2 * np.pi * freq / sr))[:, None]
            prev = poly[:, : 2 * j + 1].copy()
            poly[:, 1: 2 * j + 2] -= c * prev
            poly[:, 2: 2 * j + 3] += r * r * prev
        return poly

    a, b = polynomial(poles), polynomial(zeros)
    gain = (a.sum(1) / b.sum(1))[:, None]  # unit gain at DC
    response = gain * np.fft.rfft(b, nfft) / np.fft.rfft(a, nfft)
    out_frames = np.fft.irfft(spec * response, nfft)  # [T, nfft]
    n_frames = out_frames.shape[0]
    out = np.zeros((n_frames - 1) * hop + nfft)
    for j in range(nfft // hop):  # overlap-add, one hop-wide column of every frame at a time
        out[j * hop: j * hop + n_frames * hop] += out_frames[:, j * hop:(j + 1) * hop].reshape(-1)
    return out[win_len: win_len + n] * (2 * hop / win_len)  # Hann at hop N/4 sums to 2


def _channel(rng: np.random.Generator, video: dict, x: np.ndarray) -> np.ndarray:
    """Room, microphone, noise and loudness: the recording, not the speaker."""
    sr, n = SAMPLE_RATE, len(x)
    if video["rt60"] > 0:
        m = int(video["rt60"] * sr)
        tail = rng.standard_normal(m) * 10 ** (-3 * np.arange(m) / m)
        ir = np.concatenate([[1.0], video["wet"] * tail / np.sqrt(np.sum(tail ** 2))])
        x = signal.fftconvolve(x, ir)[:n]
    x = signal.sosfilt(video["eq"], x)
    x = x / (np.sqrt(np.mean(x ** 2)) + 1e-9)
    noise = signal.lfilter([1.0], [1.0, -video["noise_colour"]], rng.standard_normal(n))
    noise /= np.sqrt(np.mean(noise ** 2)) + 1e-9
    snr = rng.uniform(8.0, 40.0)
    x = x + noise * 10 ** (-snr / 20)
    if video["hum"] > 0:
        t = np.arange(n) / sr
        x += video["hum"] * sum(np.sin(2 * np.pi * video["mains"] * h * t) / h for h in (1, 2, 3))
    x *= 10 ** (rng.uniform(-32.0, -16.0) / 20) / (np.sqrt(np.mean(x ** 2)) + 1e-9)
    peak = np.max(np.abs(x))
    return x * (0.98 / peak) if peak > 0.98 else x


def _video_channel(rng: np.random.Generator) -> dict:
    """What stays fixed within one video: room, microphone band, noise colour, mains hum."""
    hp, lp = rng.uniform(50, 250), rng.uniform(3400, 7600)
    return {
        "rt60": rng.uniform(0.15, 0.6) if rng.random() < 0.6 else 0.0,
        "wet": rng.uniform(0.1, 0.6),
        "eq": np.concatenate([signal.butter(2, hp, "highpass", fs=SAMPLE_RATE, output="sos"),
                              signal.butter(4, lp, "lowpass", fs=SAMPLE_RATE, output="sos")]),
        "noise_colour": rng.uniform(0.0, 0.97),
        "hum": rng.uniform(0.01, 0.05) if rng.random() < 0.15 else 0.0,
        "mains": 50.0 if rng.random() < 0.5 else 60.0,
    }


def synth_utterance(ident: Identity, rng: np.random.Generator, seconds: tuple[float, float] = UTTERANCE_SECONDS,
                    video: dict | None = None) -> np.ndarray:
    """One utterance of `ident` as float32 in [-1, 1] at 16 kHz: speech, pauses, channel."""
    sr = SAMPLE_RATE
    n = int(round(utterance_seconds(rng, seconds) * sr))
    plan = _plan_speech(ident, rng, n)
    vowels, fric, pitch = plan["vowels"], plan["fric"], plan["pitch"]

    # Melody: syllable targets joined linearly, plus a slow wander.
    t = np.arange(n) / sr
    grid = np.arange(0, n / sr + 0.25, 0.25)
    semis = np.interp(t, pitch[:, 0], pitch[:, 1]) + np.interp(t, grid, 0.3 * rng.standard_normal(len(grid)))
    f0 = ident.f0 * 2 ** (semis / 12)
    voiced = _glottal_source(f0, ident, rng) * _envelope(vowels, n)

    # Formant tracks: vowel targets at vowel centres, glides between them.
    scale = _REF_VTL / ident.vtl
    real = vowels[vowels[:, 3] >= 0]
    centres = (real[:, 0] + real[:, 1]) / 2
    targets = _VOWELS[real[:, 3].astype(int)] * scale * np.exp(0.04 * rng.standard_normal((len(real), 3)))
    targets[:, 0] *= ident.f1_bias
    targets[:, 1] *= ident.f2_bias
    f4 = np.full(len(real), 3500.0 * scale)
    f5 = np.full(len(real), 4500.0 * scale)
    bandwidths = _BANDWIDTHS * (1 + 0.3 * ident.breathiness)
    speech = _vocal_tract(voiced, centres, np.stack([*targets.T, f4, f5]), bandwidths, ident.nasality)
    active = _envelope(vowels, n) > 0.5
    speech /= np.sqrt(np.mean(speech[active] ** 2)) + 1e-9 if active.any() else 1.0

    # Fricatives and bursts: noise in a speaker-scaled band, outside the vocal-tract filter.
    if len(fric):
        bands = [(3800, 7400), (2200, 5200), (1200, 7400)]  # s-like, sh-like, f-like/burst
        noise = rng.standard_normal(n)
        for b, (lo, hi) in enumerate(bands):
            seg = fric[fric[:, 3] == b]
            if len(seg):
                sos = signal.butter(2, [lo * scale, min(hi * scale, 7800)], "bandpass", fs=sr, output="sos")
                band = signal.sosfilt(sos, noise)
                speech += band / (np.std(band) + 1e-9) * _envelope(seg, n, ramp=0.005)

    if video is None:
        video = _video_channel(rng)
    return _channel(rng, video, speech).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Faces

_SUPER = 2  # drawn at twice the written size, then downsampled: anti-aliasing
_MARGIN = 0.125  # extra canvas around the crop so that rotation never shows an empty corner


def _gradient(rng: np.random.Generator, size: int) -> Image.Image:
    c1, c2 = rng.uniform(30, 235, 3), rng.uniform(30, 235, 3)
    if rng.random() < 0.3:
        c2 = c1 + rng.uniform(-15, 15, 3)
    a = rng.uniform(0, 2 * np.pi)
    u = np.linspace(-0.5, 0.5, size)
    w = np.clip(np.cos(a) * u[None, :] + np.sin(a) * u[:, None] + 0.5, 0, 1)[..., None]
    return Image.fromarray(np.clip(c1 * (1 - w) + c2 * w, 0, 255).astype(np.uint8), "RGB")


def draw_face(ident: Identity, rng: np.random.Generator) -> Image.Image:
    """One photo of `ident`: 128x128 RGB. Geometry and colour follow the identity; the
    background, pose, lighting, expression, glasses and hair details change per photo."""
    S = FACE_SIZE * _SUPER
    canvas = int(round(S * (1 + 2 * _MARGIN)))
    img = _gradient(rng, canvas)
    d = ImageDraw.Draw(img, "RGBA")
    male = ident.gender == "m"
    ageing = max(ident.age - 20, 0) / 55

    def P(x: float, y: float) -> tuple[float, float]:  # face units (crop = [0, 1]^2) -> pixels
        return ((x + _MARGIN) * S, (y + _MARGIN) * S)

    def box(x0, y0, x1, y1):
        (a, b), (c, e) = P(x0, y0), P(x1, y1)
        return [min(a, c), min(b, e), max(a, c), max(b, e)]

    def col(rgb: np.ndarray, alpha: int = 255) -> tuple[int, ...]:
        return (*(int(v) for v in np.clip(rgb, 0, 255)), alpha)

    skin = _rgb(ident.skin_rgb)
    hair = np.clip(_rgb(ident.hair_rgb) + rng.normal(0, 6, 3), 0, 255)
    zoom = math.exp(0.05 * rng.standard_normal())
    cx, cy = 0.5 + rng.uniform(-0.05, 0.05), 0.46 + rng.uniform(-0.04, 0.04)
    yaw = rng.uniform(-0.12, 0.12)  # feature shift toward one side: a head turned a little

    # Geometry from the shared attributes (and timbre, subtly), fixed per identity.
    b = 0.30 * zoom * (1 + 0.025 * ident.size + (0.02 if male else -0.02))  # half height
    ratio = 0.76 + 0.03 * ident.size + (0.03 if male else -0.02) - 0.025 * ident.timbre_0
    a = b * ratio  # half width
    jaw = np.clip(0.70 + (0.10 if male else 0.0) + 0.04 * ident.size + 0.05 * ident.timbre_1 - 0.03 * ageing, 0.5, 0.95)

    # Hair behind the head, shoulders, neck, ears.
    style = ident.hair_style
    volume = 1 + 0.05 * rng.standard_normal()
    if style == "long":
        d.rounded_rectangle(box(cx - 1.28 * a * volume, cy - 1.08 * b, cx + 1.28 * a * volume, cy + 1.35 * b),
                            radius=0.35 * S * a, fill=col(hair))
    shirt = rng.uniform(20, 230, 3)
    sw = 0.40 * (1 + 0.08 * ident.size + (0.06 if male else -0.04)) * zoom
    d.ellipse(box(cx - sw, cy + 0.95 * b, cx + sw, cy + 0.95 * b + 0.6), fill=col(shirt))
    nw = 0.42 * a * (1 + 0.1 * ident.size + (0.1 if male else 0.0))
    d.rectangle(box(cx - nw, cy + 0.3 * b, cx + nw, cy + 1.1 * b), fill=col(skin * 0.82))
    for s in (-1, 1):
        ex_ = cx + s * 0.96 * a
        d.ellipse(box(ex_ - 0.055 * zoom, cy - 0.12 * b, ex_ + 0.055 * zoom, cy + 0.22 * b), fill=col(skin * 0.9))
    if style in ("short", "curly", "bun", "long"):
        hw = 1.07 * a * volume
        d.ellipse(box(cx - hw, cy - 1.1 * b * volume, cx + hw, cy + 0.3 * b), fill=col(hair))
    if style == "bun":
        d.ellipse(box(cx - 0.35 * a, cy - 1.45 * b, cx + 0.35 * a, cy - 0.85 * b), fill=col(hair))

    # The face outline: a cranium ellipse whose lower half narrows toward the jaw and chin.
    th = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    lower = np.maximum(np.sin(th), 0)
    xs = cx + a * np.cos(th) * (1 - (1 - jaw) * lower ** 1.5)
    ys = cy + b * np.sin(th) * (1 + 0.04 * lower)
    d.polygon([P(x, y) for x, y in zip(xs, ys)], fill=col(skin))
    if not male:
        for s in (-1, 1):
            d.ellipse(box(cx + s * 0.5 * a - 0.05, cy + 0.2 * b - 0.03, cx + s * 0.5 * a + 0.05, cy + 0.2 * b + 0.03),
                      fill=(200, 80, 90, 28))

    line = col(skin * 0.62, int(60 + 120 * ageing))
    lw = max(1, int(0.006 * S))
    if ident.age > 38:  # forehead lines, crow's feet, nasolabial folds
        for i in range(min(4, int((ident.age - 38) / 9) + 1)):
            y = cy - (0.62 - 0.08 * i) * b
            d.arc(box(cx - 0.45 * a, y - 0.04, cx + 0.45 * a, y + 0.04), 200, 340, fill=line, width=lw)
        for s in (-1, 1):
            x = cx + yaw * a * 0.4
            d.line([P(x + s * 0.38 * a, cy + 0.22 * b), P(x + s * 0.5 * a, cy + 0.62 * b)], fill=line, width=lw)
    if ident.beard > 0:
        bt = np.linspace(0.15 * np.pi, 0.85 * np.pi, 30)
        outer = [P(cx + a * np.cos(t_) * (1 - (1 - jaw) * np.sin(t_) ** 1.5), cy + b * np.sin(t_) * 1.04) for t_ in bt]
        inner = [P(cx + 0.55 * a * np.cos(t_), cy + 0.45 * b + 0.25 * b * np.sin(t_)) for t_ in bt[::-1]]
        d.polygon(outer + inner, fill=col(hair, int(90 + 150 * ident.beard)))

    # Eyes, brows, nose, mouth, shifted by the yaw.
    ex = a * (0.40 + 0.035 * ident.eye_spacing)
    ey = cy - 0.08 * b
    er = a * (0.13 + 0.012 * ident.eye_size + (0.0 if male else 0.015) - 0.015 * ageing)
    fx = cx + yaw * a * 0.5
    for s in (-1, 1):
        x = fx + s * ex
        d.ellipse(box(x - er, ey - 0.55 * er, x + er, ey + 0.55 * er), fill=(238, 238, 232, 255),
                  outline=col(skin * 0.5), width=lw)
        d.ellipse(box(x - 0.5 * er, ey - 0.5 * er, x + 0.5 * er, ey + 0.5 * er), fill=col(_rgb(ident.eye_rgb)))
        d.ellipse(box(x - 0.22 * er, ey - 0.22 * er, x + 0.22 * er, ey + 0.22 * er), fill=(10, 10, 10, 255))
        bw = (0.022 if male else 0.012) * zoom
        tilt = 0.008 * ident.brow_tilt
        by = ey - 1.05 * er - 0.02
        d.polygon([P(x - 1.2 * er, by + tilt * s), P(x + 1.2 * er, by - tilt * s),
                   P(x + 1.2 * er, by - tilt * s + bw * 0.6), P(x - 1.2 * er, by + tilt * s + bw)],
                  fill=col(hair * 0.8))
    nl = b * (0.36 + 0.03 * ident.size + 0.03 * ident.nose_length)
    nwid = a * (0.15 + 0.02 * ident.timbre_2 + (0.02 if male else 0.0))
    nx = cx + yaw * a * 0.8
    d.line([P(nx, ey + 0.05 * b), P(nx + 0.3 * nwid, ey + nl)], fill=col(skin * 0.75), width=lw)
    for s in (-1, 1):
        d.ellipse(box(nx + s * nwid - 0.25 * nwid, ey + nl - 0.02, nx + s * nwid + 0.25 * nwid, ey + nl + 0.01),
                  fill=col(skin * 0.45))
    d.arc(box(nx - nwid, ey + nl - 0.05, nx + nwid, ey + nl + 0.02), 20, 160, fill=col(skin * 0.7), width=lw)
    mw = a * (0.36 + 0.03 * ident.mouth_width)
    my = cy + 0.5 * b
    mx = cx + yaw * a * 0.6
    smile = rng.uniform(-0.2, 1.0)
    lips = skin * 0.7 + np.array([150.0, 50, 60]) * (0.2 if male else 0.4)
    lip_h = b * (0.05 + (0.0 if male else 0.02))
    d.chord(box(mx - mw, my - lip_h - 0.02 * smile, mx + mw, my + lip_h + 0.03 * smile), 0, 180, fill=col(lips))
    d.chord(box(mx - mw, my - lip_h, mx + mw, my + 0.4 * lip_h), 180, 360, fill=col(lips * 0.92))
    d.line([P(mx - mw, my), P(mx + mw, my)], fill=col(lips * 0.5), width=lw)

    # Hair in front: hairline, fringe, curls or a receding crown.
    if style in ("short", "bun"):
        d.chord(box(cx - 1.02 * a, cy - 1.08 * b * volume, cx + 1.02 * a, cy - 0.35 * b), 180, 360, fill=col(hair))
    elif style == "long":
        d.chord(box(cx - 1.04 * a, cy - 1.08 * b * volume, cx + 1.04 * a, cy - 0.25 * b), 170, 370, fill=col(hair))
    elif style == "curly":
        for _ in range(40):  # the curls themselves differ from photo to photo
            t_ = rng.uniform(np.pi, 2 * np.pi)
            r_ = rng.uniform(0.75, 1.08) * volume
            x, y = cx + r_ * a * np.cos(t_), cy - 0.3 * b + r_ * 0.85 * b * np.sin(t_)
            rr = 0.06 * zoom
            d.ellipse(box(x - rr, y - rr, x + rr, y + rr), fill=col(hair * rng.uniform(0.85, 1.1)))
    else:  # receding: hair only above the ears
        for s in (-1, 1):
            d.ellipse(box(cx + s * 0.98 * a - 0.06, cy - 0.55 * b, cx + s * 0.98 * a + 0.04, cy + 0.05 * b),
                      fill=col(hair))

    if rng.random() < ident.glasses_p:
        g = col(_rgb(ident.glasses_rgb))
        gw = max(1, int(0.01 * S))
        for s in (-1, 1):
            x = fx + s * ex
            d.rounded_rectangle(box(x - 1.45 * er, ey - 0.95 * er, x + 1.45 * er, ey + 0.95 * er),
                                radius=0.4 * er * S, outline=g, width=gw)
        d.line([P(fx - ex + 1.45 * er, ey - 0.2 * er), P(fx + ex - 1.45 * er, ey - 0.2 * er)], fill=g, width=gw)

    # Pose (in-plane rotation), crop, downsample, lighting.
    img = img.rotate(rng.uniform(-10, 10), resample=Image.BICUBIC, center=(canvas / 2, canvas / 2))
    m = (canvas - S) // 2
    img = img.crop((m, m, m + S, m + S)).resize((FACE_SIZE, FACE_SIZE), Image.LANCZOS)
    arr = np.asarray(img, dtype=np.float64)
    u = np.linspace(-1, 1, FACE_SIZE)
    la = rng.uniform(0, 2 * np.pi)
    light = rng.uniform(0.82, 1.15) * (1 + rng.uniform(0, 0.22) * (np.cos(la) * u[None, :] + np.sin(la) * u[:, None]))
    warm = rng.uniform(-0.04, 0.04)
    arr = arr * light[..., None] * np.array([1 + warm, 1.0, 1 - warm])
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------------------------
# Writing


def _wav_bytes(x: np.ndarray) -> bytes:
    pcm = np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, pcm, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _jpg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _make_identity(job: tuple) -> dict:
    """All files of one identity; runs in a worker process."""
    out, seed, ident, n_utt, n_faces, seconds = job
    t0 = time.perf_counter()
    audio_s = 0.0
    u = 0
    for video_id, count in _video_plan(seed, ident.index, n_utt):
        vdir = out / "voxceleb1" / "wav" / ident.voxceleb_id / video_id
        vdir.mkdir(parents=True, exist_ok=True)
        video = None
        for k in range(count):
            rng = _rng(seed, ident.index, _KEY_UTTERANCE, u)
            if video is None:  # the first utterance's stream also draws its video's channel
                video = _video_channel(_rng(seed, ident.index, _KEY_VIDEOS, u))
            x = synth_utterance(ident, rng, seconds, video)
            atomic.write_bytes(vdir / f"{k + 1:05d}.wav", _wav_bytes(x))
            audio_s += len(x) / SAMPLE_RATE
            u += 1
    t1 = time.perf_counter()
    fdir = out / "vggface" / ident.vggface_name
    fdir.mkdir(parents=True, exist_ok=True)
    for j in range(n_faces):
        img = draw_face(ident, _rng(seed, ident.index, _KEY_FACE, j))
        atomic.write_bytes(fdir / f"{j + 1:08d}.jpg", _jpg_bytes(img))
    return {"utterances": n_utt, "audio_seconds": audio_s, "faces": n_faces,
            "voice_s": t1 - t0, "face_s": time.perf_counter() - t1}


def _write_tables(out: Path, idents: list[Identity]) -> None:
    rows = sorted(idents, key=lambda i: i.voxceleb_id)
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(META_HEADER)
    test_letters = "E"  # VoxCeleb1's verification test speakers are the 40 names starting with E
    for i in rows:
        w.writerow([i.voxceleb_id, i.vggface_name, i.gender, i.nationality,
                    "test" if i.vggface_name[0] in test_letters else "dev"])
    atomic.write_bytes(out / "vox1_meta.csv", buf.getvalue().encode())
    buf = io.StringIO()
    cols = [f.name for f in fields(Identity)]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for i in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(i).items()})
    atomic.write_bytes(out / "attributes.csv", buf.getvalue().encode())


def generate(out: Path, identities: int, utterances_per_id: int, faces_per_id: int, seed: int, workers: int,
             seconds: tuple[float, float] = UTTERANCE_SECONDS) -> dict:
    """Write a SynthVox data set under `out` and return what was made and how fast.

    Layout: out/voxceleb1/wav/idNNNNN/<video>/NNNNN.wav, out/vggface/<Name>/NNNNNNNN.jpg,
    out/vox1_meta.csv (the real file's columns) and out/attributes.csv (the hidden truth).
    The two tables are written last, so a folder without them is an interrupted run.
    """
    out = Path(out)
    if utterances_per_id < 0 or faces_per_id < 0:
        raise ValueError("synthvox: utterances and faces per identity must be >= 0")
    lo, hi = seconds
    if not 0 < lo <= hi:
        raise ValueError(f"synthvox: bad utterance length range {seconds}")
    for sub in ("voxceleb1", "vggface"):
        if (out / sub).is_dir() and any((out / sub).iterdir()):
            raise FileExistsError(f"synthvox: {out / sub} already holds files; generate into an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    idents = draw_identities(identities, seed)
    jobs = [(out, seed, i, utterances_per_id, faces_per_id, (float(lo), float(hi))) for i in idents]
    bar_args = dict(total=len(jobs), desc=f"synthvox -> {out}", unit="identity", disable=None)  # no bar in a log file
    if workers <= 1:
        results = [_make_identity(j) for j in tqdm(jobs, **bar_args)]
    else:
        # spawn: workers start clean, whatever threads or torch state the caller holds; an
        # executor (unlike Pool) raises BrokenProcessPool instead of hanging if workers die.
        ctx = multiprocessing.get_context("spawn")
        try:
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                results = list(tqdm(pool.map(_make_identity, jobs), **bar_args))
        except BrokenProcessPool as e:
            raise RuntimeError("synthvox: a worker process died (out of memory, or the calling program "
                               "cannot be re-imported by spawned workers, e.g. code piped to stdin); "
                               "run from a script or with workers=1") from e
    _write_tables(out, idents)
    secs = time.perf_counter() - t0
    n_utt = sum(r["utterances"] for r in results)
    n_faces = sum(r["faces"] for r in results)
    stats = {
        "identities": identities, "utterances": n_utt, "faces": n_faces, "seconds": round(secs, 3),
        "utterances_per_s": round(n_utt / secs, 3), "faces_per_s": round(n_faces / secs, 3),
        "audio_seconds": round(sum(r["audio_seconds"] for r in results), 2),
        "voice_cpu_s": round(sum(r["voice_s"] for r in results), 3),
        "face_cpu_s": round(sum(r["face_s"] for r in results), 3),
    }
    print(f"synthvox: {identities} identities, {n_utt} utterances ({stats['audio_seconds']:.0f} s of audio), "
          f"{n_faces} faces in {secs:.1f} s ({stats['utterances_per_s']:.2f} utterances/s, "
          f"{workers} workers) -> {out}")
    return stats
