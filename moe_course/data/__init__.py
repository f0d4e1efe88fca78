"""The data the course makes for itself (nothing is downloaded).

    clinic     make_clinic(): patients from several specialties, whose diagnoses follow interfering rules (lessons 01-05)
    corpus     Corpus, CharTokenizer: the multi-domain character corpus of facts, arithmetic and text (lessons 07-08)

Imported by training, experiments, figures and analysis; never by the model core.
"""

from .clinic import SPECIALTY_NAMES, Clinic, Patients, make_clinic
from .corpus import CharTokenizer, Corpus, CorpusConfig, LMBatch

__all__ = ["SPECIALTY_NAMES", "Clinic", "Patients", "make_clinic", "CharTokenizer", "Corpus", "CorpusConfig", "LMBatch"]
