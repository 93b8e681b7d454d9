/* sftflow's compiled text scans, each the same reading as a pure-Python reference that the tests compare it with:
 *
 * find_equations(text) -> [(start, end, alone, operations), ...]: sftflow.prepare.arithmetic.find_equations_python (_chains,
 *   _chain_equations, _after_bullet, _clear_before, _clear_after, tokenize); that code's comments say what counts as
 *   an equation. Where Python's own rules decide, this code asks Python: a word with a non-ASCII letter goes to
 *   `word_is_safe` (str.lower), and a side with a number of more than MAX_NATIVE_DIGITS digits to `side_tokens`
 *   (int()'s digit limit).
 * simple_equation_is_correct(text, start, end, ...): arithmetic.equation_is_correct(text[start:end], rel_tol) for
 *   "a op b = c" with + - * and integers of up to 9 (a, b) and 18 (c) digits, else None (Python decides).
 * find_boxed(text) -> [(start, end, content), ...]: sftflow.mathtext.find_boxed_python.
 *
 * tests/test_native_scan.py checks both against their references, on real solutions and on generated texts.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define MAX_NATIVE_DIGITS 600 /* below sys.int_info.str_digits_check_threshold (640): int() never refuses these */

typedef struct {
    int kind;
    const void *data;
    Py_ssize_t n;
    PyObject *text;
} Text;

static PyObject *word_is_safe_py = NULL; /* arithmetic._word_is_safe(word, command) */
static PyObject *side_tokens_py = NULL;  /* arithmetic._side_tokens(side) */

static inline Py_UCS4 at(const Text *t, Py_ssize_t i) { return PyUnicode_READ(t->kind, t->data, i); }

static inline int is_ascii_digit(Py_UCS4 c) { return c >= '0' && c <= '9'; }
static inline int is_operator(Py_UCS4 c) { return c == '+' || c == '-' || c == '*' || c == '/'; }
/* a character of _CHAIN_RUN: an ASCII digit, a space, an equals sign or an operator */
static inline int is_chain_char(Py_UCS4 c) { return is_ascii_digit(c) || c == ' ' || c == '=' || is_operator(c); }
static inline int is_space_tab(Py_UCS4 c) { return c == ' ' || c == '\t'; }

static const char *SEPARATING_COMMANDS[] = {"quad",    "qquad",         "text",    "textbf", "textit", "mbox",
                                            "Rightarrow", "Longrightarrow", "implies", "iff",    "therefore",
                                            "because", "approx",        "neq",     "ne",     "le",     "leq",
                                            "ge",      "geq",           "lt",      "gt",     "equiv",  "end",
                                            NULL};
static const char *OPERATOR_WORDS[] = {"times", "plus", "minus", "over", "divided", "by", "mod", "of", "squared",
                                       "cubed", NULL};

/* _word_is_safe(text[a:b], command); -1 on a Python error. */
static int word_is_safe(const Text *t, Py_ssize_t a, Py_ssize_t b, int command) {
    char word[32];
    Py_ssize_t len = b - a;
    int ascii = 1;
    for (Py_ssize_t i = a; i < b; i++) {
        if (at(t, i) >= 128) {
            ascii = 0;
            break;
        }
    }
    if (!ascii) { /* str.lower() and len() of a non-ASCII word: Python's own rules */
        PyObject *w = PyUnicode_Substring(t->text, a, b);
        if (!w) return -1;
        PyObject *r = PyObject_CallFunction(word_is_safe_py, "OO", w, command ? Py_True : Py_False);
        Py_DECREF(w);
        if (!r) return -1;
        int safe = PyObject_IsTrue(r);
        Py_DECREF(r);
        return safe;
    }
    if (!command && len < 2) return 0; /* a lone letter may be a variable */
    if (len >= (Py_ssize_t)sizeof(word)) return !command; /* longer than every listed word */
    for (Py_ssize_t i = 0; i < len; i++) {
        char c = (char)at(t, a + i);
        word[i] = (!command && c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
    }
    word[len] = '\0';
    const char **list = command ? SEPARATING_COMMANDS : OPERATOR_WORDS;
    for (; *list; list++) {
        if (strcmp(*list, word) == 0) return command;
    }
    return !command;
}

/* _clear_before(text, i, minus); -1 on a Python error. */
static int clear_before(const Text *t, Py_ssize_t i, int minus) {
    Py_ssize_t k = i;
    while (k > 0 && is_space_tab(at(t, k - 1))) k--;
    if (k == 0) return 1;
    Py_UCS4 c = at(t, k - 1);
    int spaced = k < i;
    Py_UCS4 prev = k >= 2 ? at(t, k - 2) : 0;
    if (c == '\n' || c == '$' || ((c == '[' || c == '(') && prev == '\\')) return 1;
    if (minus || !spaced) return 0;
    if (c == ',' || c == ';' || c == ':') return prev != '\\';
    if (c == '.') return prev != '.';
    if (c == '?' || c == '!') return 1;
    if (c == '\\') return prev == '\\';
    if (Py_UNICODE_ISALPHA(c)) {
        Py_ssize_t m = k - 1;
        while (m > 0 && Py_UNICODE_ISALPHA(at(t, m - 1))) m--;
        return word_is_safe(t, m, k, m > 0 && at(t, m - 1) == '\\');
    }
    return 0;
}

/* _clear_after(text, j); -1 on a Python error. */
static int clear_after(const Text *t, Py_ssize_t j) {
    Py_ssize_t n = t->n, k = j;
    while (k < n && is_space_tab(at(t, k))) k++;
    if (k == n) return 1;
    Py_UCS4 c = at(t, k);
    int spaced = k > j;
    int has_next = k + 1 < n;
    Py_UCS4 nxt = has_next ? at(t, k + 1) : 0;
    if (c == '\n' || c == '$' || c == '?') return 1;
    if (c == ',' || c == ';' || c == ':') return !(has_next && Py_UNICODE_ISDIGIT(nxt));
    if (c == '.') return nxt != '.' && !(has_next && Py_UNICODE_ISDIGIT(nxt));
    if (c == '!') return spaced;
    if (c == '\\') {
        Py_ssize_t m = k + 1;
        while (m < n && Py_UNICODE_ISALPHA(at(t, m))) m++;
        if (m > k + 1) return word_is_safe(t, k + 1, m, 1);
        return has_next && (nxt == ']' || nxt == ')' || nxt == '\\');
    }
    if (Py_UNICODE_ISALPHA(c)) {
        if (!spaced) return 0;
        Py_ssize_t m = k;
        while (m < n && Py_UNICODE_ISALPHA(at(t, m))) m++;
        return word_is_safe(t, k, m, 0);
    }
    return 0;
}

/* _side_tokens(text[s:e]) is not None, and the number of operations it holds (_operations): the operation count, -1
 * when the side is not a complete plain expression, -2 on a Python error. The side lies inside a chain, so it holds
 * only ASCII digits, spaces, + - * / ( ) and decimal points (see tokenize). */
static Py_ssize_t side_operations(const Text *t, Py_ssize_t s, Py_ssize_t e) {
    while (e > s && at(t, e - 1) == ' ') e--; /* expr.rstrip() */
    Py_ssize_t pos = s, operations = 0, depth = 0;
    int want_operand = 1;
    while (pos < e) {
        while (pos < e && at(t, pos) == ' ') pos++; /* \s* (the side's only space is ' ') */
        if (pos == e) return -1;                       /* as _TOKEN.match at the end: nothing to match */
        Py_UCS4 c = at(t, pos);
        Py_ssize_t digits_at = (c == '-') ? pos + 1 : pos;
        if (digits_at < e && is_ascii_digit(at(t, digits_at))) { /* -?\d+(?:\.\d+)? */
            Py_ssize_t q = digits_at;
            while (q < e && is_ascii_digit(at(t, q))) q++;
            Py_ssize_t longest = q - digits_at;
            if (q + 1 < e && at(t, q) == '.' && is_ascii_digit(at(t, q + 1))) {
                Py_ssize_t r = q + 1;
                while (r < e && is_ascii_digit(at(t, r))) r++;
                if (r - q - 1 > longest) longest = r - q - 1;
                q = r;
            }
            if (longest > MAX_NATIVE_DIGITS) { /* int()/Fraction() may refuse it: ask Python */
                PyObject *side = PyUnicode_Substring(t->text, s, e);
                if (!side) return -2;
                PyObject *tokens = PyObject_CallOneArg(side_tokens_py, side);
                Py_DECREF(side);
                if (!tokens) return -2;
                Py_ssize_t ops = -1;
                if (tokens != Py_None) {
                    ops = 0;
                    Py_ssize_t count = PyTuple_GET_SIZE(tokens);
                    for (Py_ssize_t i = 0; i < count; i++) {
                        PyObject *tok = PyTuple_GET_ITEM(tokens, i);
                        if (PyUnicode_Check(tok) && PyUnicode_GET_LENGTH(tok) == 1 &&
                            is_operator(PyUnicode_READ_CHAR(tok, 0)))
                            ops++;
                    }
                }
                Py_DECREF(tokens);
                return ops;
            }
            if (!want_operand) {
                if (c != '-') return -1; /* two numbers in a row */
                operations++;            /* "10 -3": a binary minus glued to its right operand */
            }
            want_operand = 0;
            pos = q;
        } else if (c == '(') {
            if (!want_operand) return -1; /* implicit product */
            depth++;
            pos++;
        } else if (c == ')') {
            if (want_operand || depth == 0) return -1;
            depth--;
            pos++;
        } else if (is_operator(c)) {
            if (want_operand) return -1; /* operator without a left operand */
            operations++;
            want_operand = 1;
            pos++;
        } else {
            return -1;
        }
    }
    if (want_operand || depth) return -1;
    return operations;
}

/* _after_bullet(text, s, e) */
static Py_ssize_t after_bullet(const Text *t, Py_ssize_t s, Py_ssize_t e) {
    if (e - s < 3) return s;
    Py_UCS4 c = at(t, s);
    if ((c != '*' && c != '+') || at(t, s + 1) != ' ') return s;
    Py_ssize_t k = s;
    while (k > 0 && is_space_tab(at(t, k - 1))) k--;
    if (k > 0 && at(t, k - 1) != '\n') return s;
    Py_ssize_t q = s + 2;
    while (q < e && at(t, q) == ' ') q++;
    return q;
}

#define MAX_STACK_SIDES 64

/* _chain_equations(text, start, end): appends (start, end, alone) tuples to `found`; -1 on error. */
static int chain_equations(const Text *t, Py_ssize_t start, Py_ssize_t end, PyObject *found) {
    Py_ssize_t count = 1;
    for (Py_ssize_t i = start; i < end; i++) count += at(t, i) == '=';
    Py_ssize_t stack_s[MAX_STACK_SIDES], stack_e[MAX_STACK_SIDES];
    Py_ssize_t *ss = stack_s, *se = stack_e;
    unsigned char stack_in[MAX_STACK_SIDES], *in_run = stack_in;
    if (count > MAX_STACK_SIDES) {
        ss = PyMem_Malloc(count * sizeof(Py_ssize_t));
        se = PyMem_Malloc(count * sizeof(Py_ssize_t));
        in_run = PyMem_Malloc(count);
        if (!ss || !se || !in_run) {
            PyMem_Free(ss);
            PyMem_Free(se);
            PyMem_Free(in_run);
            PyErr_NoMemory();
            return -1;
        }
    }
    /* the sides, each without the spaces around it (an empty side: s == e) */
    Py_ssize_t part = start, n = 0;
    for (Py_ssize_t i = start; i <= end; i++) {
        if (i == end || at(t, i) == '=') {
            Py_ssize_t a = part, b = i;
            while (a < b && at(t, a) == ' ') a++;
            while (b > a && at(t, b - 1) == ' ') b--;
            ss[n] = a;
            se[n] = b;
            in_run[n] = 0;
            n++;
            part = i + 1;
        }
    }
    int status = 0;
    Py_ssize_t last = n - 1, run_first = -1, run_last = -1, run_len = 0, operations = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        Py_ssize_t s = ss[k], e = se[k];
        int clear = k > 0;
        if (k == 0 && s < e) {
            Py_ssize_t bullet_end = after_bullet(t, s, e);
            if (bullet_end > s) {
                clear = 1;
            } else {
                clear = clear_before(t, s, at(t, s) == '-');
                if (clear < 0) goto error;
            }
            s = bullet_end;
        }
        Py_ssize_t ops = -1;
        if (clear && s < e) {
            int after = 1;
            if (k == last) {
                after = clear_after(t, e);
                if (after < 0) goto error;
            }
            if (after) {
                ops = side_operations(t, s, e);
                if (ops == -2) goto error;
            }
        }
        if (ops >= 0) {
            ss[k] = s;
            se[k] = e;
            in_run[k] = 1;
            if (run_len == 0) run_first = k;
            run_last = k;
            run_len++;
            operations += ops;
        }
        if (ops < 0 || k == last) {
            if (run_len >= 2 && operations) {
                int alone = 1;
                for (Py_ssize_t m = 0; m < n && alone; m++) {
                    if (!(m >= run_first && m <= run_last && in_run[m]) && ss[m] != se[m]) alone = 0;
                }
                PyObject *eq =
                    Py_BuildValue("(nnOn)", ss[run_first], se[run_last], alone ? Py_True : Py_False, operations);
                if (!eq || PyList_Append(found, eq) < 0) {
                    Py_XDECREF(eq);
                    goto error;
                }
                Py_DECREF(eq);
            }
            for (Py_ssize_t m = run_first; run_len && m <= run_last; m++) in_run[m] = 0;
            run_len = 0;
            operations = 0;
        }
    }
    goto done;
error:
    status = -1;
done:
    if (ss != stack_s) {
        PyMem_Free(ss);
        PyMem_Free(se);
        PyMem_Free(in_run);
    }
    return status;
}

static PyObject *find_equations(PyObject *self, PyObject *arg) {
    if (!PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "find_equations expects a str");
        return NULL;
    }
    Text t = {PyUnicode_KIND(arg), PyUnicode_DATA(arg), PyUnicode_GET_LENGTH(arg), arg};
    PyObject *found = PyList_New(0);
    if (!found) return NULL;
    Py_ssize_t pos = PyUnicode_FindChar(arg, '=', 0, t.n, 1);
    while (pos != -1) {
        if (pos == -2) goto error;
        /* the run of chain characters around this '=' (_CHAIN_RUN_REVERSED to the left, _CHAIN_RUN to the right) */
        Py_ssize_t start = pos;
        while (start > 0) {
            Py_UCS4 c = at(&t, start - 1);
            if (is_chain_char(c) || ((c == '(' || c == ')') && !(start >= 2 && at(&t, start - 2) == '\\')) ||
                (c == '.' && Py_UNICODE_ISDECIMAL(at(&t, start)) && start >= 2 &&
                 Py_UNICODE_ISDECIMAL(at(&t, start - 2))))
                start--;
            else
                break;
        }
        Py_ssize_t end = pos + 1;
        while (end < t.n) {
            Py_UCS4 c = at(&t, end);
            if (is_chain_char(c) || ((c == '(' || c == ')') && at(&t, end - 1) != '\\') ||
                (c == '.' && Py_UNICODE_ISDECIMAL(at(&t, end - 1)) && end + 1 < t.n &&
                 Py_UNICODE_ISDECIMAL(at(&t, end + 1))))
                end++;
            else
                break;
        }
        int has_operator = 0;
        for (Py_ssize_t i = start; i < end && !has_operator; i++) has_operator = is_operator(at(&t, i));
        if (has_operator && chain_equations(&t, start, end, found) < 0) goto error;
        pos = end < t.n ? PyUnicode_FindChar(arg, '=', end, t.n, 1) : -1;
    }
    return found;
error:
    Py_DECREF(found);
    return NULL;
}

/* find_boxed_python: each \\boxed{...} or \\fbox{...} (spaces allowed before the brace), braces balanced, an
 * escaped character skipped; an unclosed one is ignored. The search goes on right after each opening brace, as
 * re.finditer does after a match, so boxes inside a box are found too. */
static PyObject *find_boxed(PyObject *self, PyObject *arg) {
    if (!PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "find_boxed expects a str");
        return NULL;
    }
    Text t = {PyUnicode_KIND(arg), PyUnicode_DATA(arg), PyUnicode_GET_LENGTH(arg), arg};
    PyObject *spans = PyList_New(0);
    if (!spans) return NULL;
    Py_ssize_t pos = 0;
    while (pos < t.n) {
        pos = PyUnicode_FindChar(arg, '\\', pos, t.n, 1);
        if (pos == -1) break;
        if (pos == -2) goto error;
        Py_ssize_t q = pos + 1, word = 0;
        static const char *names[] = {"boxed", "fbox"};
        for (int w = 0; w < 2 && !word; w++) {
            Py_ssize_t len = (Py_ssize_t)strlen(names[w]), i = 0;
            while (i < len && q + i < t.n && at(&t, q + i) == (Py_UCS4)names[w][i]) i++;
            if (i == len) word = len;
        }
        if (!word) {
            pos++;
            continue;
        }
        q += word;
        while (q < t.n && Py_UNICODE_ISSPACE(at(&t, q))) q++;
        if (q >= t.n || at(&t, q) != '{') {
            pos++;
            continue;
        }
        Py_ssize_t open = q + 1, i = open, depth = 1;
        while (i < t.n) { /* [^{}\\]*\} : content without braces or escapes */
            Py_UCS4 c = at(&t, i);
            if (c == '{' || c == '}' || c == '\\') break;
            i++;
        }
        if (i < t.n && at(&t, i) == '}') {
            depth = 0;
            i++;
        } else {
            i = open;
            while (i < t.n && depth) {
                Py_UCS4 c = at(&t, i);
                if (c == '\\' && i + 1 < t.n) {
                    i += 2;
                    continue;
                }
                if (c == '{')
                    depth++;
                else if (c == '}')
                    depth--;
                i++;
            }
        }
        if (depth == 0) {
            PyObject *content = PyUnicode_Substring(arg, open, i - 1);
            PyObject *span = content ? Py_BuildValue("(nnN)", pos, i, content) : NULL;
            if (!span || PyList_Append(spans, span) < 0) {
                Py_XDECREF(span);
                goto error;
            }
            Py_DECREF(span);
        }
        pos = open;
    }
    return spans;
error:
    Py_DECREF(spans);
    return NULL;
}

/* Digits text[*pos:] as a number of at most max_digits digits: the count read (0: none, or too many: -1). */
static int read_digits(const Text *t, Py_ssize_t *pos, Py_ssize_t end, int max_digits, unsigned __int128 *value) {
    Py_ssize_t i = *pos;
    unsigned __int128 v = 0;
    while (i < end && is_ascii_digit(at(t, i))) {
        if (i - *pos >= max_digits) return -1;
        v = v * 10 + (at(t, i) - '0');
        i++;
    }
    int count = (int)(i - *pos);
    *pos = i;
    *value = v;
    return count;
}

static Py_ssize_t skip_spaces(const Text *t, Py_ssize_t i, Py_ssize_t end) {
    while (i < end && at(t, i) == ' ') i++;
    return i;
}

/* equation_is_correct's "a op b = c" path for integers: the equation text[start:end] read as
 * ` *(\d+) *([-+*]) *(\d+) *= *(\d+) *` (its _SIMPLE with spaces for \s, ASCII digits for \d and an integer stated
 * value), a and b of at most 9 digits, c of at most 18; then True iff miss == 0 or miss * den <= num * |value|, with
 * rel_tol = num / den exactly (den given as its high and low 64 bits). None for any other equation. */
static PyObject *simple_equation_is_correct(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"text", "start", "end", "numerator", "denominator_high", "denominator_low", NULL};
    PyObject *arg;
    Py_ssize_t start, end;
    unsigned long long numerator, den_high, den_low;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "UnnKKK", keywords, &arg, &start, &end, &numerator, &den_high,
                                     &den_low))
        return NULL;
    Text t = {PyUnicode_KIND(arg), PyUnicode_DATA(arg), PyUnicode_GET_LENGTH(arg), arg};
    if (start < 0 || end > t.n || start > end || end - start >= 4300 || numerator >= (1ULL << 63) ||
        den_high >= (1ULL << 63) || (den_high == 0 && den_low == 0))
        Py_RETURN_NONE; /* outside what this path reads: equation_is_correct decides */
    unsigned __int128 a, b, stated, den = ((unsigned __int128)den_high << 64) | den_low;
    Py_ssize_t i = skip_spaces(&t, start, end);
    if (read_digits(&t, &i, end, 9, &a) <= 0) Py_RETURN_NONE;
    i = skip_spaces(&t, i, end);
    if (i >= end) Py_RETURN_NONE;
    Py_UCS4 op = at(&t, i++);
    if (op != '+' && op != '-' && op != '*') Py_RETURN_NONE;
    i = skip_spaces(&t, i, end);
    if (read_digits(&t, &i, end, 9, &b) <= 0) Py_RETURN_NONE;
    i = skip_spaces(&t, i, end);
    if (i >= end || at(&t, i++) != '=') Py_RETURN_NONE;
    i = skip_spaces(&t, i, end);
    if (read_digits(&t, &i, end, 18, &stated) <= 0) Py_RETURN_NONE;
    if (skip_spaces(&t, i, end) != end) Py_RETURN_NONE; /* a decimal stated value, or more text */
    __int128 value = op == '+' ? (__int128)(a + b) : op == '-' ? (__int128)a - (__int128)b : (__int128)(a * b);
    unsigned __int128 magnitude = value < 0 ? (unsigned __int128)(-value) : (unsigned __int128)value;
    __int128 diff = (__int128)stated - value;
    unsigned __int128 miss = diff < 0 ? (unsigned __int128)(-diff) : (unsigned __int128)diff;
    /* miss * den <= num * |value|  <=>  miss <= floor(num * |value| / den) for integers; num * |value| < 2^123 */
    if (miss == 0 || miss <= (numerator * magnitude) / den) Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

static PyObject *set_callbacks(PyObject *self, PyObject *args) {
    PyObject *word_is_safe, *side_tokens;
    if (!PyArg_ParseTuple(args, "OO", &word_is_safe, &side_tokens)) return NULL;
    Py_XSETREF(word_is_safe_py, Py_NewRef(word_is_safe));
    Py_XSETREF(side_tokens_py, Py_NewRef(side_tokens));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"find_equations", find_equations, METH_O, "(start, end, alone) of each plain arithmetic equation in a text."},
    {"simple_equation_is_correct", (PyCFunction)(void (*)(void))simple_equation_is_correct, METH_VARARGS | METH_KEYWORDS,
     "equation_is_correct for an integer 'a op b = c', or None for another equation."},
    {"find_boxed", find_boxed, METH_O, "(start, end, content) of each \\boxed{} in a text."},
    {"set_callbacks", set_callbacks, METH_VARARGS, "The Python functions this module defers to (_word_is_safe, _side_tokens)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_scan", NULL, -1, methods};

PyMODINIT_FUNC PyInit__scan(void) {
    PyObject *m = PyModule_Create(&module);
    /* the digest of this file when it was compiled: sftflow.native uses the module only if the source is unchanged */
    if (m && PyModule_AddStringConstant(m, "SOURCE_SHA256", SOURCE_SHA256) < 0) Py_CLEAR(m);
    return m;
}
