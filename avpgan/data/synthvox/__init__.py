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

One module per job: identity.py (the attributes, names, ids and split), voice.py (the
source-filter synthesis), face.py (the drawing), write.py (the files, in parallel).
"""

from avpgan.data.synthvox.face import FACE_SIZE, draw_face
from avpgan.data.synthvox.identity import SPLIT_SHARES, Identity, draw_identities, draw_identity, split_counts
from avpgan.data.synthvox.voice import SAMPLE_RATE, UTTERANCE_SECONDS, synth_utterance, utterance_seconds
from avpgan.data.synthvox.write import JPEG_QUALITY, META_HEADER, generate

__all__ = [
    "FACE_SIZE", "JPEG_QUALITY", "META_HEADER", "SAMPLE_RATE", "SPLIT_SHARES", "UTTERANCE_SECONDS", "Identity",
    "draw_face", "draw_identities", "draw_identity", "generate", "split_counts", "synth_utterance",
    "utterance_seconds",
]
