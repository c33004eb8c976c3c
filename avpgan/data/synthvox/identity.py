"""SynthVox identities: the hidden attributes of every speaker, drawn from their own seed, then
unique VGGFace-style names, VoxCeleb-style ids and the identity split, drawn once for all.

Every random stream of an identity is a node (seed, identity index, key) of one SeedSequence
spawn tree, the keys below; write.py draws the videos, utterances and faces from the same tree,
so what an identity writes depends on nothing but (seed, index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from avpgan import seeding
from avpgan.config import DataConfig

# VoxCeleb1's identity split (Nagrani et al.): 924 train, 112 val, 189 test of 1225 with faces.
SPLIT_SHARES = {"val": 112 / 1225, "test": 189 / 1225}

# Keys of the SeedSequence spawn tree below (seed, identity index).
KEY_ATTRS, KEY_VIDEOS, KEY_UTTERANCE, KEY_FACE = 0, 1, 2, 3
KEY_NAMES = (1 << 31) - 1  # (seed, KEY_NAMES) is a one-element key: never an identity's


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


def _hex(rgb) -> str:
    return "#%02x%02x%02x" % tuple(int(np.clip(round(c), 0, 255)) for c in rgb)


def spawn_rng(seed: int, *key: int) -> np.random.Generator:
    """Node `key` of the spawn tree under `seed` (see the KEY_* constants)."""
    return seeding.rng(seed, spawn_key=key)


def draw_identity(seed: int, index: int) -> Identity:
    """The hidden attributes of identity `index`; name, id and split are filled in later."""
    rng = spawn_rng(seed, index, KEY_ATTRS)
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
    rng = spawn_rng(seed, KEY_NAMES)
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
