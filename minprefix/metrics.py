"""BLEU (sacrebleu's defaults) and ROUGE-1/2/L (Google's rouge-score defaults), in plain Python.

BLEU (Papineni et al., 2002) with sacrebleu's default choices: 13a tokenization, n-grams up to N = 4, uniform
weights, 'exp' smoothing, brevity penalty against the closest reference length, statistics summed over the corpus:

    BLEU = 100 * BP * exp( sum_n (1/N) log p_n ),   p_n = sum clipped n-gram matches / sum hypothesis n-grams
    BP   = 1 if c >= r else exp(1 - r / c),         c = hypothesis tokens, r = closest reference tokens

ROUGE (Lin, 2004) as rouge_score computes it without stemming, for one prediction against one target:

    ROUGE-N: P = |pred n-grams & target n-grams| / |pred n-grams|,  R = same / |target n-grams|  (multiset &)
    ROUGE-L: P = LCS(pred, target) / |pred|,                        R = LCS(pred, target) / |target|
    F = 2PR / (P + R), 0 when P + R = 0
"""
import math
import re
from collections import Counter
from typing import NamedTuple

MAX_ORDER = 4

# mteval-v13a.pl's punctuation rules, as sacrebleu applies them in order to ' ' + line + ' '.
_13A_RULES = [
    # split off every ASCII symbol except ' , - . : the classes are {|}~ [\]^_` space!"#$%& ()*+ :;<=>?@ /
    (re.compile(r'([\{-\~\[-\` -\&\(-\+\:-\@\/])'), r' \1 '),
    (re.compile(r'([^0-9])([\.,])'), r'\1 \2 '),  # period and comma, unless preceded by a digit ...
    (re.compile(r'([\.,])([^0-9])'), r' \1 \2'),  # ... or followed by one: 1,000.50 stays one token
    (re.compile(r'([0-9])(-)'), r'\1 \2 '),  # dash after a digit: 3-4 -> 3 - 4
]


def tokenize_13a(line: str) -> str:
    """sacrebleu's default preprocessing of a segment (rstrip, then tokenizer 13a): tokens joined by single spaces."""
    line = line.rstrip().replace('<skipped>', '').replace('-\n', '').replace('\n', ' ')
    # &amp; is decoded after &quot; so '&amp;quot;' becomes '&quot;', not '"', as in sacrebleu
    line = line.replace('&quot;', '"').replace('&amp;', '&').replace('&lt;', '<').replace('&gt;', '>')
    line = f' {line} '
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return ' '.join(line.split())


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _bleu_stats(hypothesis: str, references: list[str]) -> list[int]:
    """[c, r, matches_1..4, totals_1..4] for one segment."""
    if not references:
        raise ValueError('BLEU needs at least one reference per hypothesis, got an empty list')
    hyp = tokenize_13a(hypothesis).split()
    refs = [tokenize_13a(ref).split() for ref in references]
    # closest reference length; on a tie, the shorter one
    r = min((len(ref) for ref in refs), key=lambda n: (abs(n - len(hyp)), n))
    matches, totals = [], []
    for n in range(1, MAX_ORDER + 1):
        hyp_counts = _ngrams(hyp, n)
        max_ref_counts = Counter()  # a hypothesis n-gram is clipped at its largest count in any one reference
        for ref in refs:
            max_ref_counts |= _ngrams(ref, n)
        matches.append(sum((hyp_counts & max_ref_counts).values()))
        totals.append(sum(hyp_counts.values()))
    return [len(hyp), r] + matches + totals


def _bleu_from_stats(stats: list[int], effective_order: bool) -> float:
    c, r, matches, totals = stats[0], stats[1], stats[2:2 + MAX_ORDER], stats[2 + MAX_ORDER:]
    if not any(matches):
        return 0.0
    # sacrebleu's 'exp' smoothing (NIST, Chen & Cherry 2014 method 3): the k-th order with no match gets
    # p_n = 1 / (2^k * totals_n) instead of 0.
    log_p, k = [], 0
    for m, t in zip(matches, totals):
        if t == 0:  # no hypothesis has n tokens; higher orders are empty too
            break
        if m == 0:
            k += 1
        log_p.append(math.log(m / t if m else 1 / (2 ** k * t)))
    # Effective order (sentence BLEU) averages only the orders the hypothesis has; otherwise a missing order
    # is p_n = 0, which sacrebleu floors at log 0 = -1e10, i.e. BLEU 0.
    if not effective_order and len(log_p) < MAX_ORDER:
        return 0.0
    bp = 1.0 if c >= r else math.exp(1 - r / c)
    return 100 * bp * math.exp(sum(log_p) / len(log_p))


def corpus_bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """BLEU in [0, 100] as sacrebleu.corpus_bleu gives it; references[i] holds the references of hypotheses[i].

    (sacrebleu takes the transpose: one list per reference stream.)
    """
    if len(hypotheses) != len(references):
        raise ValueError(f'corpus_bleu: {len(hypotheses)} hypotheses but {len(references)} reference lists; '
                         'references[i] must hold the references of hypotheses[i]')
    stats = [0] * (2 + 2 * MAX_ORDER)
    for hyp, refs in zip(hypotheses, references):
        stats = [a + b for a, b in zip(stats, _bleu_stats(hyp, refs))]
    return _bleu_from_stats(stats, effective_order=False)


def sentence_bleu(hypothesis: str, references: list[str]) -> float:
    """BLEU in [0, 100] of one hypothesis, as sacrebleu.sentence_bleu gives it (effective order on)."""
    return _bleu_from_stats(_bleu_stats(hypothesis, references), effective_order=True)


class Score(NamedTuple):
    precision: float
    recall: float
    fmeasure: float


def tokenize_rouge(text: str) -> list[str]:
    """rouge_score's default tokens: lowercase, then the runs of [a-z0-9]; everything else separates.

    (rouge_score replaces [^a-z0-9]+ by a space, splits on whitespace and drops empty tokens: the same list.)
    """
    return re.findall(r'[a-z0-9]+', text.lower())


def _score(overlap: int, n_pred: int, n_target: int) -> Score:
    p = overlap / n_pred if n_pred else 0.0
    r = overlap / n_target if n_target else 0.0
    return Score(p, r, 2 * p * r / (p + r) if p + r > 0 else 0.0)


def rouge_n(prediction: str, target: str, n: int) -> Score:
    """ROUGE-N of `prediction` against `target` (rouge_score's 'rouge<n>')."""
    if n < 1:
        raise ValueError(f'rouge_n: n must be a positive n-gram order, got n={n}')
    pred, tgt = _ngrams(tokenize_rouge(prediction), n), _ngrams(tokenize_rouge(target), n)
    return _score(sum((pred & tgt).values()), sum(pred.values()), sum(tgt.values()))


def _lcs_length(a: list[str], b: list[str]) -> int:
    # L[i][j] = L[i-1][j-1] + 1 if a[i] == b[j] else max(L[i-1][j], L[i][j-1]), one row at a time
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def rouge_l(prediction: str, target: str) -> Score:
    """Sentence-level ROUGE-L of `prediction` against `target` (rouge_score's 'rougeL', not 'rougeLsum')."""
    pred, tgt = tokenize_rouge(prediction), tokenize_rouge(target)
    return _score(_lcs_length(pred, tgt), len(pred), len(tgt))
