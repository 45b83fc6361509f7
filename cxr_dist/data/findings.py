"""The findings vocabulary, harmonised across sources (docs/findings.md).

"Abnormal" means something different in each collection, so next to the binary label the shards
can carry per-finding targets: NIH ChestX-ray14's 14 findings plus ``any_finding`` (the source's
normal/abnormal label, always annotated). A finding that a source does not annotate is MASKED,
never counted as negative.

    vocab = vocabulary(cfg.data.findings)              # () or the names, "any_finding" last
    m = source_mapping(src)                             # the format's shipped table + src.findings_map
    annotated = m.annotated(raw_keys)                   # which findings this source labels
    m.targets(raw, label, vocab, annotated)             # {finding: 0/1} of one sample, annotated only

Readers keep each sample's raw labels in the row column FINDING_VALUES (`encode_values`): a JSON
object {raw label: value} with value "1" (present), "0" (absent), "-1" (uncertain) or "" (blank),
or "" when the sample's findings are unknown (IU's `No Indexing`). IU lists its MeSH terms, NIH its
`Finding Labels`, a folder source the class folder name, a csv source its finding columns.

Raw labels are matched case-insensitively, "_" read as a space. A key "Heading/q1/q2" matches a
raw label with that heading and at least those qualifiers (IU's MeSH terms, e.g.
"Costophrenic Angle/left/blunted" is matched by "costophrenic angle/blunted"); the keys with the
most qualifiers win, and if several tie, all of them apply. A target is "finding", "?finding"
(uncertain: the source's `uncertain` policy decides) or several, comma-separated; "" maps to nothing.
No pandas, no torch: the index, the stream and the readers may all import this.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..config import ConfigError, DataConfig, SourceConfig, sources_of

# NIH ChestX-ray14's findings in the order of its paper (Wang et al. 2017) and TorchXRayVision.
NIH14 = ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia", "pneumothorax",
         "consolidation", "edema", "emphysema", "fibrosis", "pleural_thickening", "hernia")
ANY_FINDING = "any_finding"  # = the source's normal/abnormal label; always annotated, always last
FINDINGS = NIH14 + (ANY_FINDING,)  # every name data.findings accepts
SETS = {"nih14": NIH14}  # names data.findings expands
POLICIES = ("mask", "0", "1")  # what a source's uncertain (-1) and blank values become
FINDING_VALUES = "finding_values"  # the readers' row column of raw labels (module docstring)
VALUES = ("1", "0", "-1", "")  # present, absent, uncertain, blank
_RANK = {"": 0, "0": 1, "-1": 2, "1": 3}  # several raw labels for one finding: the highest wins

# ----------------------------------------------------------------------------- shipped mappings
#
# IU X-ray (format "iu"): MeSH terms (the `MeSH` column; `Problems` holds their headings) ->
# findings, one reason each. IU's indexers coded every finding of a report, so a finding that a
# report does not list is negative. "?x": the term suggests x without stating it (uncertain).
# Terms not listed here map to nothing (like the "" rows); they still make any_finding positive.
# docs/findings.md has the counts on the shared copy and the reasoning in full.
IU_TERMS: tuple[tuple[str, str, str], ...] = (
    # --- mapped: the term is the finding
    ("Cardiomegaly", "cardiomegaly", "enlarged heart: NIH's Cardiomegaly (mild, moderate, severe)"),
    ("Cardiomegaly/borderline", "?cardiomegaly", "borderline heart size: neither stated nor excluded"),
    ("Cardiac Shadow/enlarged", "cardiomegaly", "an enlarged cardiac silhouette is how reports state cardiomegaly"),
    ("Cardiac Shadow/borderline", "?cardiomegaly", "borderline cardiac silhouette"),
    ("Cardiac Shadow/enlarged/borderline", "?cardiomegaly", "borderline cardiac silhouette"),
    ("Pulmonary Atelectasis", "atelectasis", "MeSH's name for atelectasis"),
    ("Volume Loss/lung", "?atelectasis", "lung volume loss is atelectasis's sign, not the diagnosis"),
    ("Pleural Effusion", "effusion", "NIH's Effusion is pleural effusion"),
    ("Hydropneumothorax", "pneumothorax,effusion", "air and fluid in the pleural space"),
    ("Hemopneumothorax", "pneumothorax,effusion", "air and blood in the pleural space"),
    ("Hemothorax", "effusion", "blood in the pleural space shows as an effusion"),
    ("Costophrenic Angle/blunted", "?effusion,?pleural_thickening",
     "a blunted angle is a small effusion or pleural thickening; the report does not say which"),
    ("Sulcus/blunted", "?effusion,?pleural_thickening", "a blunted sulcus, as Costophrenic Angle/blunted"),
    ("Infiltrate", "infiltration", "NIH's Infiltration"),
    ("Mass", "mass", "NIH's Mass (lung, mediastinum, chest wall)"),
    ("Mass/breast", "", "a breast mass is soft tissue outside the thorax, not NIH's Mass"),
    ("Nodule", "nodule", "NIH's Nodule"),
    ("Pneumonia", "pneumonia", "NIH's Pneumonia"),
    ("Pneumothorax", "pneumothorax", "NIH's Pneumothorax"),
    ("Consolidation", "consolidation", "NIH's Consolidation"),
    ("Pulmonary Edema", "edema", "NIH's Edema is pulmonary edema"),
    ("Pulmonary Congestion", "?edema", "vascular congestion precedes edema; edema itself is not stated"),
    ("Emphysema", "emphysema", "NIH's Emphysema"),
    ("Pulmonary Emphysema", "emphysema", "MeSH's name for emphysema"),
    ("Bullous Emphysema", "emphysema", "a form of emphysema"),
    ("Blister/lung", "?emphysema", "lung bullae: a feature of emphysema, not the diagnosis"),
    ("Pulmonary Disease, Chronic Obstructive", "?emphysema",
     "COPD on a film is hyperinflation; emphysema is one cause, not stated"),
    ("Lung/hyperdistention", "?emphysema", "hyperinflated lungs suggest emphysema (or a deep breath)"),
    ("Lung, Hyperlucent", "?emphysema", "hyperlucent lung suggests emphysema, not stated"),
    ("Diaphragm/flattened", "?emphysema", "flattened diaphragms are a sign of hyperinflation"),
    ("Pulmonary Fibrosis", "fibrosis", "NIH's Fibrosis"),
    ("Fibrosis", "fibrosis", "fibrosis (IU codes it once, in the lung)"),
    ("Lung Diseases, Interstitial", "?fibrosis", "interstitial lung disease is often, not always, fibrosis"),
    ("Cicatrix/lung", "?fibrosis", "lung scarring is focal fibrosis; NIH's Fibrosis was mined from 'fibrosis'"),
    ("Cicatrix/pleura", "?pleural_thickening", "pleural scarring usually shows as pleural thickening"),
    ("Thickening/pleura", "pleural_thickening", "NIH's Pleural_Thickening"),
    ("Hernia, Hiatal", "hernia", "NIH's Hernia is (almost always) a hiatal hernia"),
    ("Hernia, Diaphragmatic", "hernia", "a diaphragmatic hernia is NIH's Hernia"),
    ("Airspace Disease", "?consolidation,?infiltration,?pneumonia",
     "airspace opacity: consolidation, infiltrate or pneumonia, the report does not say which"),
    ("Opacity/lung", "?infiltration,?consolidation",
     "an unspecified lung opacity: consistent with infiltration or consolidation, neither stated"),
    ("Opacity/retrocardiac", "?atelectasis,?consolidation", "retrocardiac opacity: atelectasis or consolidation"),
    ("Density/lung", "?infiltration,?consolidation", "an unspecified lung density, like Opacity/lung"),
    # --- unmapped: not one of the 14 (they still count for any_finding)
    ("Lung", "", "hypoinflation (low volumes: effort or technique), hilum, azygos lobe: not among the 14"),
    ("Opacity", "", "opacities outside the lung (ribs, thorax, mediastinum): not among the 14"),
    ("Density", "", "densities outside the lung (thorax, ribs, mediastinum): not among the 14"),
    ("Calcinosis", "", "calcification (aorta, lymph nodes, lung): not among the 14"),
    ("Calcified Granuloma", "", "a healed granuloma; NIH's Nodule was not mined from it (TorchXRayVision keeps it apart)"),
    ("Granuloma", "", "a healed granuloma, as Calcified Granuloma"),
    ("Granulomatous Disease", "", "old granulomatous infection, as Calcified Granuloma"),
    ("Cicatrix", "", "scars elsewhere (costophrenic angle, ribs, breast)"),
    ("Thickening", "", "bronchial or interstitial thickening, not pleural"),
    ("Markings", "", "prominent bronchovascular or interstitial markings: nonspecific, often chronic"),
    ("Cardiac Shadow", "", "cardiac silhouette other than enlarged (obscured, irregular)"),
    ("Costophrenic Angle", "", "an obscured angle: not a finding of the 14"),
    ("Diaphragm", "", "an elevated or obscured hemidiaphragm: not among the 14"),
    ("Diaphragmatic Eventration", "", "a thin, raised diaphragm: not a hernia"),
    ("Aorta", "", "tortuous or ectatic aorta: vascular, not among the 14"),
    ("Aorta, Thoracic", "", "as Aorta"),
    ("Atherosclerosis", "", "vascular calcification: not among the 14"),
    ("Mediastinum", "", "a prominent mediastinum: not among the 14"),
    ("Pulmonary Artery", "", "enlarged pulmonary arteries: not among the 14"),
    ("Heart Failure", "", "a clinical diagnosis; its film findings (cardiomegaly, edema, effusion) are coded on their own"),
    ("Pericardial Effusion", "", "fluid around the heart, not NIH's (pleural) Effusion"),
    ("Subcutaneous Emphysema", "", "air in the soft tissues, not lung emphysema"),
    ("Cystic Fibrosis", "", "a genetic disease, not pulmonary fibrosis"),
    ("Technical Quality of Image Unsatisfactory", "", "about the film, not the patient"),
    ("Thoracic Vertebrae", "", "spine (degenerative change): not among the 14"),
    ("Spine", "", "spine (degenerative change): not among the 14"),
    ("Lumbar Vertebrae", "", "spine: not among the 14"),
    ("Scoliosis", "", "spine: not among the 14"),
    ("Kyphosis", "", "spine: not among the 14"),
    ("Osteophyte", "", "spine: not among the 14"),
    ("Spondylosis", "", "spine: not among the 14"),
    ("Spinal Fusion", "", "spine surgery: not among the 14"),
    ("Deformity", "", "bone deformity (vertebrae, ribs, clavicle): not among the 14"),
    ("Fractures, Bone", "", "fractures: not among the 14"),
    ("Arthritis", "", "joints: not among the 14"),
    ("Bone Diseases, Metabolic", "", "osteopenia: not among the 14"),
    ("Lucency", "", "lucencies (bone, lung): nonspecific"),
    ("Shoulder", "", "the shoulder: not among the 14"),
    ("Catheters, Indwelling", "", "a support device: not among the 14"),
    ("Surgical Instruments", "", "surgical clips and wires: not among the 14"),
    ("Implanted Medical Device", "", "pacemakers and ports: not among the 14"),
    ("Medical Device", "", "a support device: not among the 14"),
    ("Tube, Inserted", "", "a support device: not among the 14"),
    ("Stents", "", "a support device: not among the 14"),
    ("Sutures", "", "surgical material: not among the 14"),
    ("Foreign Bodies", "", "foreign material: not among the 14"),
    ("Epicardial Fat", "", "a normal variant"),
    ("Heart", "", "an obscured heart border: the cause (atelectasis, consolidation) is coded on its own"),
    ("Sulcus", "", "an obscured sulcus: not among the 14"),
    ("Volume Loss", "", "volume loss of the thorax (after surgery): not among the 14"),
    ("Cavitation", "", "a lung cavity: an infection or a tumour, not one of the 14"),
    ("Cysts", "", "lung or bone cysts: not among the 14"),
    ("Shift", "", "a mediastinal or tracheal shift: a sign, its cause coded on its own"),
    ("Hypertension, Pulmonary", "", "enlarged pulmonary arteries: vascular, not among the 14"),
    ("Sclerosis", "", "bone sclerosis: not among the 14"),
    ("Hyperostosis, Diffuse Idiopathic Skeletal", "", "spine: not among the 14"),
    ("Pneumonectomy", "", "a lung resected: surgery, not among the 14"),
    ("Mastectomy", "", "breast surgery: outside the thorax"),
    ("Breast Implants", "", "outside the thorax"),
)

# IU `Problems` values that are not terms: "normal" (nothing found: every annotated finding
# negative) and "No Indexing" (the report was not indexed: every finding but any_finding masked).
IU_SPECIAL = {"normal": "nothing found: every finding IU annotates is negative",
              "no indexing": "not indexed: every finding but any_finding is masked (no_indexing decides the label)"}

# NIH ChestX-ray14 (format "nih"): its `Finding Labels` are the 14 findings (identity); "No Finding"
# lists nothing, so every finding is negative.
NIH_LABELS: tuple[tuple[str, str, str], ...] = tuple(
    (name.capitalize() if name != "pleural_thickening" else "Pleural_Thickening", name, "identity") for name in NIH14)

# Folder classes and csv columns (formats "folder", "csv"): a finding's own name (any case, "_" or
# a space), and CheXpert's 14 columns (Irvin et al. 2019) where one of ours is the same finding.
NAMES: tuple[tuple[str, str, str], ...] = tuple((name, name, "the finding's own name") for name in NIH14) + (
    ("Pleural Effusion", "effusion", "CheXpert's column for NIH's Effusion"),
    ("No Finding", "", "CheXpert: the label column says normal/abnormal (any_finding)"),
    ("Enlarged Cardiomediastinum", "", "CheXpert: heart or mediastinum; not cardiomegaly alone"),
    ("Lung Opacity", "", "CheXpert: any opacity; not one of the 14"),
    ("Lung Lesion", "", "CheXpert: nodule or mass, not which"),
    ("Pleural Other", "", "CheXpert: other pleural findings"),
    ("Fracture", "", "CheXpert: not among the 14"),
    ("Support Devices", "", "CheXpert: not among the 14"),
)

SHIPPED = {"iu": IU_TERMS, "nih": NIH_LABELS, "folder": NAMES, "csv": NAMES}
# Formats whose raw labels list what is present (absent = negative) and whose vocabulary is the
# whole table: they annotate every finding their mapping reaches. The others (folder, csv)
# annotate the findings that the classes or columns actually present map to.
WHOLE_TABLE = ("iu", "nih")


# ----------------------------------------------------------------------------- vocabulary


def norm_name(text: str) -> str:
    """A finding name as data.findings may spell it: "Pleural_Thickening", "pleural thickening" ->
    "pleural_thickening"."""
    return "_".join(str(text).replace("_", " ").split()).lower()


def vocabulary(names: Iterable[str]) -> tuple[str, ...]:
    """The findings the shards carry for data.findings: () for (); else the names in the order given
    ("nih14" expands to NIH14), duplicates dropped, "any_finding" last. ConfigError for unknown names."""
    names = list(names)
    if not names:
        return ()
    out: list[str] = []
    unknown = []
    for name in names:
        key = norm_name(name)
        for n in SETS.get(key, (key,)):
            if n not in FINDINGS:
                unknown.append(name)
            elif n not in out and n != ANY_FINDING:
                out.append(n)
    if unknown:
        raise ConfigError(f"data.findings: unknown finding(s) {', '.join(repr(u) for u in unknown)}; allowed: "
                          f"{', '.join(repr(s) for s in SETS)} (= NIH's 14) or names among {', '.join(FINDINGS)}")
    return tuple(out) + (ANY_FINDING,)


# ----------------------------------------------------------------------------- raw labels


def raw_key(text: str) -> tuple[str, frozenset[str]]:
    """(heading, qualifiers) of a raw label or mapping key: case-insensitive, "_" read as a space."""
    parts = [" ".join(p.replace("_", " ").split()).lower() for p in str(text).split("/")]
    return parts[0], frozenset(p for p in parts[1:] if p)


def encode_values(values: dict[str, str] | None) -> str:
    """One sample's raw labels as the row column FINDING_VALUES stores them ("" = unknown)."""
    return "" if values is None else json.dumps(values, sort_keys=True, ensure_ascii=False)


def decode_values(text: object) -> dict[str, str] | None:
    """encode_values's inverse; None (findings unknown) for "" or a missing cell (NaN)."""
    if not isinstance(text, str) or not text:
        return None
    return json.loads(text)


def cell_value(text: object) -> str | None:
    """A CheXpert-style cell ("1", "1.0", "0", "-1", "", ...) -> one of VALUES; None if not one."""
    t = str(text).strip()
    if t == "":
        return ""
    try:
        v = float(t)
    except ValueError:
        return None
    return {1.0: "1", 0.0: "0", -1.0: "-1"}.get(v)


# ----------------------------------------------------------------------------- one source


Target = tuple[str, bool]  # (finding, uncertain)


def _targets(text: str, where: str) -> tuple[Target, ...]:
    """ "a,?b" -> (("a", False), ("b", True)); "" -> (); ConfigError for names outside NIH14."""
    out: list[Target] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        uncertain = item.startswith("?")
        name = norm_name(item[1:] if uncertain else item)
        if name == ANY_FINDING:
            raise ConfigError(f"{where}: {ANY_FINDING!r} is the source's normal/abnormal label and cannot be "
                              "mapped to; map to the findings among " + ", ".join(NIH14))
        if name not in NIH14:
            raise ConfigError(f"{where}: unknown finding {item!r}; allowed: {', '.join(NIH14)} "
                              "(\"?name\" for uncertain, several comma-separated, empty for none)")
        out.append((name, uncertain))
    return tuple(out)


@dataclass(frozen=True)
class SourceMapping:
    """One source's raw labels -> findings: its format's shipped table with src.findings_map on
    top, and its uncertain / blank policies."""
    source: str
    format: str
    rules: dict[tuple[str, frozenset[str]], tuple[Target, ...]]
    uncertain: str = "mask"
    blank: str = "mask"
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def match(self, label: str) -> tuple[Target, ...]:
        """The targets of one raw label: those of the matching keys with the most qualifiers."""
        if label not in self._cache:
            self._cache[label] = self._match(label)
        return self._cache[label]

    def _match(self, label: str) -> tuple[Target, ...]:
        heading, quals = raw_key(label)
        best, out = -1, []
        for (h, q), targets in self.rules.items():
            if h == heading and q <= quals:
                if len(q) > best:
                    best, out = len(q), []
                if len(q) == best:
                    out += targets
        return tuple(out)

    def knows(self, label: str) -> bool:
        """Whether a raw label (a csv column name) has a rule, mapped or not."""
        heading, _ = raw_key(label)
        return any(h == heading for h, _ in self.rules)

    def annotated(self, raw_labels: Iterable[str] = ()) -> tuple[str, ...]:
        """The findings this source labels (NIH14 order, any_finding excluded): for iu and nih
        every finding its rules reach; for folder and csv those reached by `raw_labels` (the
        class names or finding columns actually present)."""
        if self.format in WHOLE_TABLE:
            reached = {f for targets in self.rules.values() for f, _ in targets}
        else:
            reached = {f for label in raw_labels for f, _ in self.match(label)}
        return tuple(f for f in NIH14 if f in reached)

    def targets(self, values: dict[str, str] | None, label: int, vocab: tuple[str, ...],
                annotated: Iterable[str]) -> dict[str, int]:
        """One sample's targets {finding: 0/1} over `vocab`, the annotated and unmasked ones only;
        any_finding = `label`. `values`: its raw labels (decode_values), None when unknown."""
        out: dict[str, int] = {ANY_FINDING: int(label)} if ANY_FINDING in vocab else {}
        if values is None:
            return out
        wanted = [f for f in annotated if f in vocab]
        state: dict[str, str] = {}
        for raw, value in values.items():
            for finding, uncertain in self.match(raw):
                v = "-1" if uncertain and value == "1" else value
                if finding not in state or _RANK[v] > _RANK[state[finding]]:
                    state[finding] = v
        for finding in wanted:
            v = state.get(finding, "0")  # listed formats: not listed = absent
            if v == "-1":
                v = self.uncertain
            elif v == "":
                v = self.blank
            if v != "mask":
                out[finding] = int(v)
        return out


def parse_map(entries: Iterable[str], where: str) -> dict[tuple[str, frozenset[str]], tuple[Target, ...]]:
    """src.findings_map ("RAW=finding", "RAW=?a,b", "RAW=") -> rules; ConfigError for a malformed entry."""
    rules = {}
    for entry in entries:
        raw, eq, target = str(entry).partition("=")
        if not eq or not raw.strip():
            raise ConfigError(f"{where}: findings_map entry {entry!r} must be \"RAW=finding\" (e.g. "
                              "\"PNEUMONIA=pneumonia\", \"Opacity/lung=?infiltration\", \"Granuloma=nodule\"), "
                              "or \"RAW=\" to map RAW to nothing")
        rules[raw_key(raw.strip())] = _targets(target, f"{where}: findings_map entry {entry!r}")
    return rules


def source_mapping(src: SourceConfig) -> SourceMapping:
    """src's mapping (its format's SHIPPED table, then src.findings_map over it); ConfigError for a
    malformed findings_map entry, an unknown finding or an uncertain/blank policy outside POLICIES."""
    where = f"data.sources {src.name!r}"
    for policy in ("uncertain", "blank"):
        value = getattr(src, policy)
        if value not in POLICIES:
            raise ConfigError(f"{where}: {policy} must be one of {', '.join(repr(p) for p in POLICIES)} "
                              f"(mask: not a label; \"0\": negative; \"1\": positive), not {value!r}")
    shipped = SHIPPED.get(src.format, ())
    rules = {raw_key(key): _targets(target, f"shipped {src.format} mapping") for key, target, _ in shipped}
    rules.update(parse_map(src.findings_map, where))
    return SourceMapping(source=src.name, format=src.format, rules=rules, uncertain=src.uncertain, blank=src.blank)


def check(data: DataConfig) -> tuple[str, ...]:
    """Validate data.findings and every source's findings settings; the vocabulary. ConfigError."""
    vocab = vocabulary(data.findings)
    for src in sources_of(data):
        source_mapping(src)
    return vocab


# ----------------------------------------------------------------------------- prepare


def sample_targets(vocab: tuple[str, ...], sources: Iterable[SourceConfig],
                   records: list[dict]) -> tuple[list[dict[str, int]], dict[str, dict]]:
    """What prepare writes for the rows `records` (a table's rows: source, label, FINDING_VALUES):
    each row's targets (SourceMapping.targets) and, per source, what the index records of it
    ({"annotated", "findings_map", "uncertain", "blank"})."""
    mappings = {s.name: source_mapping(s) for s in sources}
    decoded = [decode_values(r.get(FINDING_VALUES)) for r in records]
    seen: dict[str, set[str]] = {name: set() for name in mappings}
    for r, values in zip(records, decoded):
        seen[r["source"]].update(values or ())
    annotated = {name: m.annotated(seen[name]) for name, m in mappings.items()}
    targets = [mappings[r["source"]].targets(values, int(r["label"]), vocab, annotated[r["source"]])
               for r, values in zip(records, decoded)]
    info = {s.name: {"annotated": [f for f in annotated[s.name] if f in vocab], "findings_map": list(s.findings_map),
                     "uncertain": s.uncertain, "blank": s.blank} for s in sources}
    return targets, info


def counts(targets: Iterable[dict[str, int]], vocab: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """{finding: {"positive", "negative", "masked"}} over some samples' targets (index.json)."""
    out = {f: {"positive": 0, "negative": 0, "masked": 0} for f in vocab}
    for t in targets:
        for f in vocab:
            out[f]["masked" if f not in t else "positive" if t[f] else "negative"] += 1
    return out


# ----------------------------------------------------------------------------- the IU table, measured


def iu_term_counts(reports_csv: str) -> dict[str, int]:
    """Reports per `Problems` term (a term counted once per report) of an IU `indiana_reports.csv`,
    most frequent first: what docs/findings.md's table was measured with."""
    import csv
    from collections import Counter

    counts: Counter = Counter()
    spellings: dict[str, Counter] = {}  # "Thoracic vertebrae" and "Thoracic Vertebrae" are one term
    with open(reports_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            terms = {" ".join(t.split()) for t in row["Problems"].split(";") if t.strip()}
            for term in terms:
                spellings.setdefault(raw_key(term)[0], Counter())[term] += 1
            counts.update({raw_key(t)[0] for t in terms})
    named = {spellings[k].most_common(1)[0][0]: n for k, n in counts.items()}
    return dict(sorted(named.items(), key=lambda kv: (-kv[1], kv[0].lower())))


def iu_key_counts(reports_csv: str) -> dict[str, int]:
    """Reports with a MeSH term that each IU_TERMS key matches (heading and at least its
    qualifiers; a report counted once per key) of an IU `indiana_reports.csv`."""
    import csv
    from collections import Counter

    keys = [(key, raw_key(key)) for key, _, _ in IU_TERMS]
    counts: Counter = Counter()
    with open(reports_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            terms = [raw_key(t) for t in (row.get("MeSH") or row["Problems"]).split(";") if t.strip()]
            counts.update({key for key, (h, q) in keys for th, tq in terms if th == h and q <= tq})
    return dict(counts)


def iu_term_rules(term: str) -> list[tuple[str, str, str]]:
    """The shipped IU rows (key, target, reason) for a `Problems` term (a MeSH heading): its own row
    first, then those for it with qualifiers; [] when the table does not list it."""
    heading = raw_key(term)[0]
    rows = [r for r in IU_TERMS if raw_key(r[0])[0] == heading]
    return sorted(rows, key=lambda r: len(raw_key(r[0])[1]))


def main(argv: list[str]) -> int:
    """`python -m cxr_dist.data.findings IU_DIR [MIN_REPORTS]`: each `Problems` term with at least
    MIN_REPORTS reports (default 1), its count and what the shipped table does with it (markdown)."""
    import sys
    from pathlib import Path

    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if argv else 2
    least = int(argv[1]) if len(argv) > 1 else 1
    out = ["| `Problems` term (MeSH key) | reports | maps to | why |", "| --- | ---: | --- | --- |"]
    reports = str(Path(argv[0]) / "indiana_reports.csv")
    by_key = iu_key_counts(reports)
    for term, n in iu_term_counts(reports).items():
        if n < least:
            continue
        rows = iu_term_rules(term)
        if raw_key(term)[0] in IU_SPECIAL:
            out.append(f"| {term} | {n} | (special) | {IU_SPECIAL[raw_key(term)[0]]} |")
        elif not rows:
            out.append(f"| {term} | {n} | nothing (not listed) | |")
        for key, target, reason in rows:
            if not raw_key(key)[1]:
                shown = str(n)
            else:  # a key with qualifiers: part of the heading's row above it, when there is one
                shown = f"{by_key.get(key, 0)}" + (" of them" if not raw_key(rows[0][0])[1] else "")
            out.append(f"| {key} | {shown} | {target or 'nothing'} | {reason} |")
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
