"""The E2E NLG challenge's official metrics (tuetschek/e2e-metrics, measure_scores.py), in plain Python.

measure_scores.py reads one output per line and one list of references per input (every line `.strip()`ped) and
reports BLEU and NIST from MTEval and METEOR, ROUGE-L and CIDEr from the MS-COCO caption scripts. We follow its
`-p` path for BLEU and NIST, its own Python port metrics/pymteval.py (BLEUScore, NISTScore), as the prefix-tuning
paper's code does (`measure_scores.py gold pred -p -t -H`), and its bundled pycocoevalcap for ROUGE-L and CIDEr.
METEOR is left out: it needs Java and METEOR 1.5's paraphrase tables. Its CSV/TSV reader also repairs
mis-encoded '£' and 'é'; the strings given here are taken as they are.

BLEU and NIST (pymteval). Each text is tokenized as mteval-v13a's basic normalization (`tokenize_13a`, the same
regexes), split on single spaces, so an empty text is one empty token, and n-grams are lowercased (case_sensitive
off; the Perl script lowercases ASCII only). With c_s the hypothesis length of segment s, refs R_s, and
count_X(g) the count of n-gram g in X, summed over the corpus:

    BLEU = BP * exp( (1/4) sum_{n=1..4} log( max(m_n, 1e-15) / max(t_n, 1e-9) ) )
    m_n  = sum_s sum_g min(count_hyp(g), max_{r in R_s} count_r(g)),   t_n = sum_s (c_s - n + 1)
    BP   = exp(1 - r / c) if c <= r else 1,   c = t_1 (1e-5 if 0),   r = sum_s |closest ref| (tie: the shorter)

so no smoothing: an order without matches gives log(1e-15), not sacrebleu's 'exp' smoothing, and a segment
shorter than n - 1 tokens adds a negative count to t_n (sacrebleu and the Perl script add 0), which can even push
BLEU above 1 on a corpus of very short hypotheses.

    NIST = BP_N * sum_{n=1..5} ( sum_s sum_g info(g) * min(count_hyp(g), max_r count_r(g)) ) / t_n
    info(w_1..w_n) = log2( C(w_1..w_{n-1}) / C(w_1..w_n) ),  C = counts over all references of the corpus
                     (every reference counted, not clipped), C(empty 0-gram) = number of reference words
    BP_N = exp( -beta * ln(min(c / L, 1))^2 ),  beta = -ln(0.5) / ln(1.5)^2,  L = sum_s mean_{r in R_s} |r|

(0 when c = 0). L averages each segment's own references; mteval-v13a-sig.pl, which measure_scores.py runs
without -p, divides the total reference length by the corpus-wide mean number of references per segment
instead, which differs when segments have different numbers of references (pymteval's docstring says so; on
E2E corpora we saw 0.0004 to 0.015 NIST). The Perl script also smooths BLEU like sacrebleu's 'exp' and counts
max(0, c_s - n + 1) n-grams.

ROUGE-L and CIDEr (pycocoevalcap, as bundled and as on PyPI: the same arithmetic). Texts first go through the
Stanford PTBTokenizer (CoreNLP 3.4.1, -lowerCase -preserveLines), then the tokens in PUNCTUATIONS are dropped;
`ptb_tokenize` is our pure-Python version, see its docstring. ROUGE-L splits the result on single spaces (an
empty text is one empty token), CIDEr on whitespace. Per hypothesis h with references R:

    ROUGE-L(h) = (1 + b^2) P R / (R + b^2 P),  b = 1.2,  P = max_r LCS(h, r) / |h|,  R = max_r LCS(h, r) / |r|
                 (0 if P or R is 0), corpus ROUGE-L = mean over hypotheses

CIDEr is the coco-caption CiderScorer, which is CIDEr-D (clipping, Gaussian length penalty) under the name
CIDEr. With N the number of hypotheses (images), df(g) the number of hypotheses among whose references g occurs,
and per order n the tf-idf vector v_n(x)[g] = count_x(g) * (ln N - ln max(1, df(g))):

    CIDEr(h) = 10/|R| * sum_{r in R} (1/4) sum_{n=1..4} e^(-(l_h - l_r)^2 / (2 * 6^2)) *
               sum_g min(v_n(h)[g], v_n(r)[g]) v_n(r)[g] / (|v_n(h)| |v_n(r)|)     (the division skipped if a norm is 0)

where l_x is the number of words in x (the scorer counts bigrams, max(|x| - 1, 0): the same differences except
where a text is empty, and then the cosine is 0 anyway), and corpus CIDEr = mean over hypotheses.
"""
import math
import re
from collections import Counter
from functools import lru_cache

from .metrics import _lcs_length, tokenize_13a

# ---------------------------------------------------------------- PTBTokenizer, as pycocoevalcap runs it

_L, _A = r'[^\W\d_]', r'[^\W_]'  # a letter; a letter or digit
_CLITIC = rf"'(?:[sdm]|re|ve|ll)(?!{_L})|n't(?!{_L})"
# Rules tried in order, each at the current position of one whitespace-free chunk; the first that matches wins.
_PTB_FIRST = re.compile('|'.join([
    rf'(?P<split>(can)(not)|(gon|wan)(na)|(got)(ta)|(lem|gim)(me))(?!{_L})',  # cannot -> can not, gonna -> gon na
    rf"(?P<word>{_L}+?(?=n't)|{_A}+(?='(?:[sdm]|re|ve|ll)(?!{_L})))",  # do|n't, it|'s, 1990|'s
    rf"(?P<clitic>{_CLITIC}|'n'|'n(?!{_L})|'t(?=(?:is|was)(?!{_L}))|'(?:em|cause|\d0s)(?!{_L}))",
    rf"(?P<apos>[onldj]'{_L}{{2,}}|[ldjy]')",  # o'clock, d'oeuvre; d' and y' before anything shorter
]), re.IGNORECASE)
# Then the longest of these wins (the lexer's rule); ties go to the earlier one.
_PTB_LONGEST = [re.compile(p) for p in [
    r'[-+]?(?:\d*(?:[.,:/]\d+)+|\d+)',  # numbers: -25, 10.50, 1,000, 5:30, 5/5, .5
    rf'{_A}(?:{_A}|[.,])*(?:-{_A}+)+',  # hyphenated: family-friendly, 20-25, 5-star
    rf'{_L}{_A}*(?:[.!?]{_L}{_A}*)*|\d{_A}*',  # words (centre.it stays one token), 10am, 1st
    rf'{_A}+(?:/{_A}+)+',  # and/or
    rf'(?:{_L}\.){{2,}}|[A-Z]\.',  # u.s.a., e.g., initials
    r'(?i:mrs?|ms|dr|prof|st|rd|ave|sq|mt|[js]r|gen|co|corp|ltd|inc|bros|dept|messrs|etc|vs|ft|blvd|col|capt|lt'
    r'|sgt|rev|hon|gov|pres|sen|rep|mme|mlle|esq|cie|cf|al|jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon'
    r'|tues?|wed|thurs|thu|fri)\.',  # the lexer's abbreviations that keep their period
    r'[A-Z]+&[A-Z]+',  # AT&T, B&B
    rf'{_A}+@{_A}+(?:\.{_A}+)*|[@#]{_L}{_A}*',  # e-mail addresses, @handles, #tags
]]
_PTB_SYMBOLS = re.compile(r"\.+|[!?]{2,}|-+|'+|`+|.")  # runs first, else one character
_PTB_MAP = {'(': '-LRB-', ')': '-RRB-', '[': '-LSB-', ']': '-RSB-', '{': '-LCB-', '}': '-RCB-', '£': '#',
            '€': '$', '¢': 'cents', '…': '...', '–': '--', '—': '--', '½': '1/2', '¼': '1/4', '¾': '3/4'}
# pycocoevalcap's PUNCTUATIONS, compared with the lowercased tokens: '-LRB-' etc. never match '-lrb-', so
# brackets survive as '-lrb-', '-rrb-' in the official pipeline, and so they do here.
_PTB_DROP = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_QUOTES = str.maketrans({'\u2018': "'", '\u2019': "'", '\u201a': "'", '\u201b': "'", '\u0092': "'",
                         '\u201c': '"', '\u201d': '"', '\u201e': '"'})


@lru_cache(maxsize=1 << 16)
def _ptb_chunk(chunk: str) -> tuple[str, ...]:
    """The lowercased PTB tokens of a whitespace-free chunk (the lexer never joins across our whitespace)."""
    return tuple(t.lower() for t in _ptb_lex(chunk))


def _ptb_lex(chunk: str):
    i = 0
    while i < len(chunk):
        m = _PTB_FIRST.match(chunk, i)
        if m and m.group('split'):
            yield from (g for g in m.groups()[1:] if g)
        elif m:
            yield m.group()
        elif m := max((p.match(chunk, i) for p in _PTB_LONGEST), key=lambda x: x.end() if x else -1):
            if chunk[m.end():m.end() + 2] in ('.,', '.;', '.:'):  # a period before , ; : stays on: 'centre.,'
                yield m.group() + '.'
                i = m.end() + 1
                continue
            yield m.group()
        else:
            m = _PTB_SYMBOLS.match(chunk, i)
            # runs of periods, hyphens and quotes become '.', '...', '-', '--', "'", '``' ...: all dropped
            yield '.' if m.group()[0] in '.-\'`"' else _PTB_MAP.get(m.group(), m.group())
        i = m.end()


def ptb_tokenize(text: str) -> str:
    """The text as pycocoevalcap gives it to ROUGE-L and CIDEr: PTBTokenizer tokens, lowercased, punctuation out.

    Matches Stanford CoreNLP 3.4.1's PTBTokenizer (-preserveLines -lowerCase) on every reference of the E2E
    train/valid/test sets and on E2E-style text (checked against the jar): '£ 30' -> '# 30' (its currency
    normalization: also € -> $, ¢ -> cents), 'Café' -> 'café', '5 out of 5' unchanged, "it's" -> "it 's",
    "isn't" -> "is n't", but the E2E files' "isn 't" -> 'isn t' (a lone "'t" is a quote then 't'), 'cannot' ->
    'can not', 'family-friendly' and '20-25' one token, '20-' -> '20' (the hyphen is dropped), '-25' kept, '£20-£25'
    -> '# 20 # 25', '(x)' -> '-lrb- x -rrb-', '!!' kept. Dropped: ' '' ` `` . ? ! , : ; - -- ... (and — – …).
    Known differences from the Java lexer, none of which occurs in E2E data: its context-dependent sentence-final
    period after a lowercase initial or an abbreviation missing from our list, URLs, emoticons, SGML/XML,
    fractions and phone numbers that it joins across a (non-breaking) space, soft hyphens, zero-width spaces,
    and the rarer apostrophe words.
    """
    text = text.translate(_QUOTES).replace('&amp;', '&')  # its normalizeAmpersandEntity
    tokens = (t for chunk in text.split() for t in _ptb_chunk(chunk))
    return ' '.join(t for t in tokens if t not in _PTB_DROP)


# ---------------------------------------------------------------- BLEU and NIST, as pymteval computes them

BLEU_ORDER, NIST_ORDER = 4, 5
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2  # the length penalty is 0.5 where c / L = 2/3


def mteval_tokenize(text: str) -> list[str]:
    """pymteval's tokens: mteval-v13a normalization of the stripped line, lowercased, split on single spaces."""
    # On a stripped line pymteval's tokenize equals sacrebleu's 13a (whose rstrip only differs before a final
    # '-\n'). Python's ''.split(' ') is [''], so an empty text is one (empty) token, as in pymteval.
    return tokenize_13a(text.strip()).lower().split(' ')


def _check(hypotheses: list[str], references: list[list[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f'{len(hypotheses)} hypotheses but {len(references)} reference lists; '
                         'references[i] must hold the references of hypotheses[i]')
    if not hypotheses or not all(references):
        raise ValueError('the E2E metrics need at least one hypothesis and at least one reference for each')


def _grams(tokens, n: int) -> Counter:
    return Counter(zip(*(tokens[i:] for i in range(n))))  # metrics._ngrams, counted in C: the hot loop


def _mteval(hypotheses: list[str], references: list[list[str]]) -> tuple[float, float]:
    """(BLEU in [0, 1], NIST) from one pass over the corpus: both need the same clipped n-gram matches."""
    _check(hypotheses, references)
    tokens = lru_cache(maxsize=None)(mteval_tokenize)  # a text often recurs (the same reference, ...)
    ref_counts = Counter()  # every reference n-gram, n = 0..5 (the 0-gram () counts the reference words), for NIST
    hits, totals, c, r, avg_ref_len = [], [0] * NIST_ORDER, 0, 0, 0.0
    for hyp, refs in zip(hypotheses, references):
        hyp, refs = tokens(hyp), [tokens(ref) for ref in refs]
        for n in range(1, NIST_ORDER + 1):
            max_ref = {}  # a hypothesis n-gram is clipped at its largest count in any one reference
            for ref in refs:
                ref_n = _grams(ref, n)
                ref_counts.update(ref_n)
                for g, k in ref_n.items():
                    if k > max_ref.get(g, 0):
                        max_ref[g] = k
            hits.append({g: min(k, max_ref[g]) for g, k in _grams(hyp, n).items() if g in max_ref})
            totals[n - 1] += len(hyp) - n + 1  # negative for a hypothesis shorter than n - 1, as in pymteval
        ref_counts[()] += sum(len(ref) for ref in refs)
        c += len(hyp)
        r += min((len(ref) for ref in refs), key=lambda k: (abs(k - len(hyp)), k))  # tie: the shorter
        avg_ref_len += sum(len(ref) for ref in refs) / len(refs)

    matches, info = [0] * NIST_ORDER, [0.0] * NIST_ORDER
    for seg_hits in hits:
        for g, k in seg_hits.items():
            matches[len(g) - 1] += k
            info[len(g) - 1] += math.log2(ref_counts[g[:-1]] / ref_counts[g]) * k
    bp = math.exp(1 - r / (c or 1e-5)) if c <= r else 1.0
    bleu = bp * math.exp(sum(math.log(max(m, 1e-15) / max(t, 1e-9))
                             for m, t in zip(matches[:BLEU_ORDER], totals)) / BLEU_ORDER)
    if 0 in totals:  # pymteval raises ZeroDivisionError
        return bleu, math.nan
    ratio = c / avg_ref_len
    bp = 1.0 if ratio >= 1 else 0.0 if ratio <= 0 else math.exp(-NIST_BETA * math.log(ratio) ** 2)
    return bleu, bp * sum(i / t for i, t in zip(info, totals))


def pymteval_bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU in [0, 1] as e2e-metrics' pymteval BLEUScore (4-grams, no smoothing, lowercased)."""
    return _mteval(hypotheses, references)[0]


def pymteval_nist(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus NIST (5-grams, information weights from the references) as e2e-metrics' pymteval NISTScore.

    NaN where pymteval divides by zero: no hypothesis n-grams of some order n <= 5 in the whole corpus."""
    return _mteval(hypotheses, references)[1]


# ---------------------------------------------------------------- ROUGE-L and CIDEr, as pycocoevalcap computes them

ROUGE_BETA, CIDER_ORDER, CIDER_SIGMA = 1.2, 4, 6.0


def coco_rouge_l(hypotheses: list[str], references: list[list[str]], tokenize: bool = True) -> float:
    """Mean sentence ROUGE-L in [0, 1] as pycocoevalcap's Rouge (tokenize=False: texts are PTB-tokenized already)."""
    _check(hypotheses, references)
    scores = []
    for hyp, refs in zip(hypotheses, references):
        hyp = (ptb_tokenize(hyp) if tokenize else hyp).split(' ')  # single spaces: '' is one empty token
        lcs = [(_lcs_length(hyp, ref), len(ref)) for ref in
               ((ptb_tokenize(r) if tokenize else r).split(' ') for r in refs)]
        p, r = max(k / len(hyp) for k, _ in lcs), max(k / n for k, n in lcs)
        scores.append((1 + ROUGE_BETA ** 2) * p * r / (r + ROUGE_BETA ** 2 * p) if p and r else 0.0)
    return sum(scores) / len(scores)


def coco_cider(hypotheses: list[str], references: list[list[str]], tokenize: bool = True) -> float:
    """Corpus CIDEr-D (x10) as pycocoevalcap's Cider (tokenize=False: texts are PTB-tokenized already)."""
    _check(hypotheses, references)
    tok = ptb_tokenize if tokenize else (lambda s: s)

    def counts(text):  # all n-grams, n = 1..4, and the length
        words = tok(text).split()
        grams = Counter()
        for n in range(1, CIDER_ORDER + 1):
            grams.update(_grams(words, n))
        return grams, len(words)

    hyps = [counts(h) for h in hypotheses]
    refs = [[counts(r) for r in rs] for rs in references]
    df = Counter(g for rs in refs for g in set().union(*(grams for grams, _ in rs)))
    log_n = math.log(len(hypotheses))

    def vector(grams):  # tf-idf weights and their norm, one of each per order
        vec = [{} for _ in range(CIDER_ORDER)]
        for g, tf in grams.items():
            vec[len(g) - 1][g] = tf * (log_n - math.log(max(1.0, df[g])))
        return vec, [math.sqrt(sum(w * w for w in v.values())) for v in vec]

    scores = []
    for (h_grams, h_len), rs in zip(hyps, refs):
        h_vec, h_norm = vector(h_grams)
        total = [0.0] * CIDER_ORDER
        for r_grams, r_len in rs:
            r_vec, r_norm = vector(r_grams)
            penalty = math.exp(-(h_len - r_len) ** 2 / (2 * CIDER_SIGMA ** 2))
            for n in range(CIDER_ORDER):
                val = sum(min(w, r_vec[n].get(g, 0.0)) * r_vec[n].get(g, 0.0) for g, w in h_vec[n].items())
                if h_norm[n] and r_norm[n]:
                    val /= h_norm[n] * r_norm[n]
                total[n] += val * penalty
        scores.append(sum(total) / CIDER_ORDER / len(rs) * 10.0)
    return sum(scores) / len(scores)


def e2e_scores(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU (0-100), NIST, ROUGE-L (0-100) and CIDEr as the E2E challenge's measure_scores.py reports them
    (its pymteval path for BLEU and NIST), on the scales of the prefix-tuning paper's table. No METEOR.

    references[i] holds the references of hypotheses[i]: for E2E, all the texts of one table (the paper's
    generation script writes 'Error' in place of an empty output before scoring; here '' is scored as it is).
    """
    _check(hypotheses, references)
    hyps, refs = [ptb_tokenize(h) for h in hypotheses], [[ptb_tokenize(r) for r in rs] for rs in references]
    bleu, nist = _mteval(hypotheses, references)
    return {'bleu': 100 * bleu, 'nist': nist, 'rouge_l': 100 * coco_rouge_l(hyps, refs, tokenize=False),
            'cider': coco_cider(hyps, refs, tokenize=False)}
