/* The per-request work of plain commands, in C (issue 3: a critical path that
 * costs about what twemproxy costs).
 *
 * Only the happy path lives here. Each function handles the inputs it fully
 * understands and stops at the first one it does not, telling the caller how
 * far it got; the Python code (resp.py, session.py) then handles the rest
 * exactly as it always did, errors and their messages included. So this module
 * never decides anything the Python path would decide differently: it is the
 * same rules, done faster, for the common case. tests/test_speedups.py checks
 * the two against each other on generated input.
 *
 *   rewrite_plain  client bytes -> server bytes for requests whose command has a
 *                  cached Spec (key positions known from the key specs): parse,
 *                  prefix or strip the keys, re-encode, in one pass.
 *   frame_end      where one RESP2/RESP3 reply ends (-1 incomplete, -2 "ask Python").
 *   frame_run      frame a run of replies that pass through unchanged and pop
 *                  their `None` entries from the session's pending deque.
 *   Hist           a latency histogram as plain counters: since(t0) is one call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>
#include <time.h>

#define MAX_FIXED 16          /* key positions a fixed Spec may hold */
#define MAX_ARGS (1 << 20)    /* larger requests go the Python way */
#define MAX_INLINE (64 * 1024)
#define MAX_DEPTH 64
#define ASK_PYTHON (-2)

/* ------------------------------------------------------------------ Spec */

typedef struct {
    PyObject_HEAD
    Py_ssize_t count;          /* requests this Spec handled (metrics add it to the plan's) */
    int nfixed;                /* > 0: the key positions are fixed[] */
    int fixed[MAX_FIXED];
    Py_ssize_t min_argc;       /* fewer arguments: the server's arity error, via Python */
    Py_ssize_t first;          /* > 0 and nfixed == 0: keys first..last by step, */
    Py_ssize_t lastkey;        /*   last = argc + lastkey (lastkey < 0) */
    Py_ssize_t step;
    int role;                  /* 0: a plain command; MULTI_OPENS / EXEC_CLOSES: the edges of a
                                  transaction block taken whole (rewrite_plain's `blocks`) */
} SpecObject;

#define MULTI_OPENS 1
#define EXEC_CLOSES 2
#define MAX_BLOCK 64               /* commands of one block the C path takes (more: Python's) */

/* Spec_init checks every invariant the rewrite loop relies on (issue 11), so a
 * wrong Spec is refused where it is built, with the rule it breaks, instead of
 * reading past a request's arguments later:
 *   - min_argc >= 1 (a request has at least its name);
 *   - fixed positions: at most MAX_FIXED, each >= 1, strictly increasing, and
 *     each below min_argc (a request the Spec takes has that argument);
 *   - a range: first >= 1, first below min_argc, lastkey < 0 (last is counted
 *     from the end, so it is below argc), step >= 1; not both forms at once.
 * The values are checked before any is stored, so a failed re-init (Spec.__init__
 * called again) leaves the previous, valid Spec as it was. */
static int
Spec_init(SpecObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fixed", "min_argc", "first", "lastkey", "step", "role", NULL};
    PyObject *fixed;
    Py_ssize_t min_argc = 1, first = 0, lastkey = 0, step = 1;
    int role = 0;
    int pos[MAX_FIXED];
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!|nnnni", kwlist, &PyTuple_Type, &fixed,
                                     &min_argc, &first, &lastkey, &step, &role))
        return -1;
    if (role != 0 && role != MULTI_OPENS && role != EXEC_CLOSES) {
        PyErr_SetString(PyExc_ValueError, "role must be 0, 1 (MULTI) or 2 (EXEC)");
        return -1;
    }
    if (role && (PyTuple_GET_SIZE(fixed) || first)) {
        PyErr_SetString(PyExc_ValueError, "MULTI and EXEC have no keys");
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(fixed);
    if (n > MAX_FIXED) {
        PyErr_SetString(PyExc_ValueError, "too many fixed key positions");
        return -1;
    }
    if (min_argc < 1) {
        PyErr_SetString(PyExc_ValueError, "min_argc must be >= 1 (the command name is an argument)");
        return -1;
    }
    if (n && first) {
        PyErr_SetString(PyExc_ValueError, "fixed positions or a range, not both");
        return -1;
    }
    if (first < 0 || step < 1 || (first && lastkey >= 0)) {
        PyErr_SetString(PyExc_ValueError, "a range needs first >= 1, lastkey < 0, step >= 1");
        return -1;
    }
    if (first && first >= min_argc) {
        PyErr_Format(PyExc_ValueError, "a range's first key (%zd) must be below min_argc (%zd)", first, min_argc);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long v = PyLong_AsLong(PyTuple_GET_ITEM(fixed, i));
        if (v == -1 && PyErr_Occurred())
            return -1;
        if (v < 1 || v > MAX_ARGS || (i && v <= pos[i - 1])) {
            PyErr_SetString(PyExc_ValueError, "fixed positions must be increasing and >= 1");
            return -1;
        }
        if (v >= min_argc) {
            PyErr_Format(PyExc_ValueError, "fixed key position %ld must be below min_argc (%zd)", v, min_argc);
            return -1;
        }
        pos[i] = (int)v;
    }
    memcpy(self->fixed, pos, n * sizeof(int));
    self->nfixed = (int)n;
    self->min_argc = min_argc;
    self->first = first;
    self->lastkey = lastkey;
    self->step = step;
    self->role = role;
    self->count = 0;
    return 0;
}

static PyMemberDef Spec_members[] = {
    {"count", T_PYSSIZET, offsetof(SpecObject, count), 0, "requests handled by the C path"},
    {"role", T_INT, offsetof(SpecObject, role), READONLY, "0 plain, 1 MULTI, 2 EXEC"},
    {NULL}
};

static PyTypeObject SpecType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._speedups.Spec",
    .tp_doc = "Where a command's keys are, for the C path: fixed positions or a range.",
    .tp_basicsize = sizeof(SpecObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Spec_init,
    .tp_members = Spec_members,
};

/* ------------------------------------------------------------------ Hist */

/* A latency histogram kept as plain counters (issue 16 item 5): `since(t0)` reads
 * the clock (CLOCK_MONOTONIC, the clock of time.perf_counter() on Linux) and adds
 * one to the bucket of now - t0, in one call; the cumulative buckets Prometheus
 * wants are built from `counts` only when scraped (proxy/stats.py). Buckets as
 * bisect_left on `bounds`: a value equal to a bound counts in that bound's bucket. */
#define HIST_MAX 32

typedef struct {
    PyObject_HEAD
    Py_ssize_t n;                          /* bounds; counts has n + 1 (the last: +Inf) */
    double bounds[HIST_MAX];
    unsigned long long counts[HIST_MAX + 1];
    double sum;
} HistObject;

static int
Hist_init(HistObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"bounds", NULL};
    PyObject *bounds;
    double b[HIST_MAX];
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!", kwlist, &PyTuple_Type, &bounds))
        return -1;
    Py_ssize_t n = PyTuple_GET_SIZE(bounds);
    if (n < 1 || n > HIST_MAX) {
        PyErr_SetString(PyExc_ValueError, "a histogram needs 1 to 32 bounds");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        b[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, i));
        if (b[i] == -1.0 && PyErr_Occurred())
            return -1;
        if (i && !(b[i] > b[i - 1])) {
            PyErr_SetString(PyExc_ValueError, "histogram bounds must increase");
            return -1;
        }
    }
    self->n = n;
    memcpy(self->bounds, b, sizeof(double) * n);
    memset(self->counts, 0, sizeof(self->counts));
    self->sum = 0.0;
    return 0;
}

static void
hist_add(HistObject *self, double v)
{
    Py_ssize_t i = 0;
    while (i < self->n && v > self->bounds[i])
        i++;
    self->counts[i]++;
    self->sum += v;
}

static PyObject *
Hist_observe(HistObject *self, PyObject *arg)
{
    double v = PyFloat_AsDouble(arg);
    if (v == -1.0 && PyErr_Occurred())
        return NULL;
    hist_add(self, v);
    Py_RETURN_NONE;
}

static PyObject *
Hist_since(HistObject *self, PyObject *arg)
{
    double t0 = PyFloat_AsDouble(arg);
    if (t0 == -1.0 && PyErr_Occurred())
        return NULL;
#ifdef CLOCK_MONOTONIC
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    /* as CPython makes perf_counter(): nanoseconds as a double, then / 1e9 */
    double now = (double)((long long)ts.tv_sec * 1000000000LL + ts.tv_nsec) / 1e9;
    hist_add(self, now - t0);
    Py_RETURN_NONE;
#else  /* (proxy/stats.py then uses its Python histogram) */
    PyErr_SetString(PyExc_NotImplementedError, "Hist.since needs CLOCK_MONOTONIC");
    return NULL;
#endif
}

static PyObject *
Hist_get_counts(HistObject *self, void *closure)
{
    PyObject *out = PyList_New(self->n + 1);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i <= self->n; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(self->counts[i]);
        if (v == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, v);
    }
    return out;
}

static PyObject *
Hist_get_bounds(HistObject *self, void *closure)
{
    PyObject *out = PyTuple_New(self->n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < self->n; i++) {
        PyObject *v = PyFloat_FromDouble(self->bounds[i]);
        if (v == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i, v);
    }
    return out;
}

static PyObject *
Hist_get_count(HistObject *self, void *closure)
{
    unsigned long long total = 0;
    for (Py_ssize_t i = 0; i <= self->n; i++)
        total += self->counts[i];
    return PyLong_FromUnsignedLongLong(total);
}

static PyObject *
Hist_get_sum(HistObject *self, void *closure)
{
    return PyFloat_FromDouble(self->sum);
}

static PyMethodDef Hist_methods[] = {
    {"observe", (PyCFunction)Hist_observe, METH_O, "observe(value): one more in value's bucket"},
    {"since", (PyCFunction)Hist_since, METH_O, "since(t0): observe(time.perf_counter() - t0)"},
    {NULL}
};

static PyGetSetDef Hist_getset[] = {
    {"counts", (getter)Hist_get_counts, NULL, "per-bucket counts, the last one +Inf (a new list)", NULL},
    {"bounds", (getter)Hist_get_bounds, NULL, "the bucket bounds", NULL},
    {"count", (getter)Hist_get_count, NULL, "values observed", NULL},
    {"sum", (getter)Hist_get_sum, NULL, "their sum", NULL},
    {NULL}
};

static PyTypeObject HistType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._speedups.Hist",
    .tp_doc = "Histogram(bounds): counts per bucket and a sum, kept in C (see proxy/stats.py).",
    .tp_basicsize = sizeof(HistObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Hist_init,
    .tp_methods = Hist_methods,
    .tp_getset = Hist_getset,
};

/* ------------------------------------------------------------------ numbers */

/* A canonical non-negative decimal (no sign, no leading zero, at most 18 digits)
 * ending at a CRLF at or after `p`. Returns the value and sets *next past the
 * CRLF; -1 when incomplete, ASK_PYTHON when not canonical. */
static Py_ssize_t
read_len(const char *p, const char *end, const char **next)
{
    const char *q = p;
    long long v = 0;
    while (q < end && *q >= '0' && *q <= '9') {
        if (q - p >= 18)
            return ASK_PYTHON;
        v = v * 10 + (*q - '0');
        q++;
    }
    if (q == end)
        return -1;
    if (q == p || (*p == '0' && q - p > 1) || *q != '\r')
        return ASK_PYTHON;
    if (q + 1 == end)
        return -1;
    if (q[1] != '\n')
        return ASK_PYTHON;
    *next = q + 2;
    return (Py_ssize_t)v;
}

static int
digits(Py_ssize_t v)
{
    int d = 1;
    while (v >= 10) {
        v /= 10;
        d++;
    }
    return d;
}

/* ------------------------------------------------------------------ requests */

typedef struct {
    const char *hdr;      /* the '$' of the argument */
    const char *data;     /* its payload */
    Py_ssize_t len;
} Arg;

/* Scratch arrays of one call: the arguments of the request being read, and the
 * key arguments of every request taken so far. They start on the C stack and move
 * to the heap only when a call needs more, doubling as arguments are actually
 * parsed (never sized from a declared count: `*16000000\r\n` alone costs nothing,
 * as in Redis, which also allocates a request's argv as its arguments arrive),
 * and the heap copy is freed when the call returns, so one large request does not
 * pin memory for good. Per-call rather than static also keeps a re-entrant call
 * (the specs dict's look-up can run Python code) from freeing the caller's
 * arrays. */
#define STACK_ARGS 32
#define STACK_KEYS 128

typedef struct {
    Arg *a;                /* stack[] or a PyMem block */
    Py_ssize_t cap;
    Arg *stack;
} Scratch;

static void
scratch_free(Scratch *s)
{
    if (s->a != s->stack)
        PyMem_Free(s->a);
    s->a = s->stack;
}

/* Room for `need` entries: doubles, but to no more than `most` (need <= most,
 * and both stay far below PY_SSIZE_T_MAX / sizeof(Arg): they count parsed args). */
static int
grow(Scratch *s, Py_ssize_t need, Py_ssize_t most)
{
    if (need <= s->cap)
        return 0;
    Py_ssize_t c = s->cap * 2;
    if (c > most)
        c = most;
    if (c < need)
        c = need;
    Arg *b;
    if (s->a == s->stack) {
        b = PyMem_Malloc(c * sizeof(Arg));
        if (b != NULL)
            memcpy(b, s->a, s->cap * sizeof(Arg));
    }
    else
        b = PyMem_Realloc(s->a, c * sizeof(Arg));
    if (b == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    s->a = b;
    s->cap = c;
    return 0;
}

static char *
put_len(char *o, Py_ssize_t v)  /* "$<v>\r\n" */
{
    char tmp[24];
    int i = 0;
    do {
        tmp[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    *o++ = '$';
    while (i)
        *o++ = tmp[--i];
    *o++ = '\r';
    *o++ = '\n';
    return o;
}

/* Command name -> Spec look-ups, cached so that a request costs no bytes object
 * and no hashing. Valid because an entry of a specs dict is never replaced or
 * removed (session.py adds one Spec per name, once); the cache holds references
 * to the dict, the name and the Spec, so none of them can be freed and reused. */
#define NAME_CACHE 64
typedef struct {
    PyObject *dict, *name, *spec;
} CacheEntry;
static CacheEntry name_cache[NAME_CACHE];

/* A new reference (the caller holds it while it uses the Spec, whatever a later
 * look-up evicts); NULL with no error set: no Spec for this name. */
static PyObject *
find_spec(PyObject *specs, const char *name, Py_ssize_t len)
{
    unsigned slot = (unsigned)(len * 31 + (len ? (unsigned char)name[0] * 7 + (unsigned char)name[len - 1] : 0))
                    % NAME_CACHE;
    CacheEntry *e = &name_cache[slot];
    if (e->dict == specs && PyBytes_GET_SIZE(e->name) == len && memcmp(PyBytes_AS_STRING(e->name), name, len) == 0) {
        Py_INCREF(e->spec);
        return e->spec;
    }
    PyObject *key = PyBytes_FromStringAndSize(name, len);
    if (key == NULL)
        return NULL;
    PyObject *found = PyDict_GetItemWithError(specs, key);  /* borrowed */
    if (found == NULL || !PyObject_TypeCheck(found, &SpecType)) {
        Py_DECREF(key);
        return NULL;
    }
    /* the entry is filled before the old one is released: releasing it may run
     * Python code (a dict's last reference), which may look a name up again */
    PyObject *old_dict = e->dict, *old_name = e->name, *old_spec = e->spec;
    Py_INCREF(specs);
    Py_INCREF(found);  /* the cache's */
    Py_INCREF(found);  /* the caller's */
    e->dict = specs;
    e->name = key;
    e->spec = found;
    Py_XDECREF(old_dict);
    Py_XDECREF(old_name);
    Py_XDECREF(old_spec);
    return found;
}

/* rewrite_plain(data, specs, mode, prefix, limit, max_bulk[, blocks]) -> (out, end, n, keys)
 *
 * Requests at the start of `data` that are complete, canonically encoded arrays
 * of bulk strings whose name has a Spec in `specs` and whose argument count the
 * Spec accepts are rewritten (mode 0: keys as they are, 1: prefix added,
 * 2: prefix stripped, and a key without it stops the run) and encoded as
 * pack_command would encode them. Stops at the first other request, after
 * `limit` requests, or at the end. `out` holds the server bytes of the n
 * requests handled (data[:end] on the client side); `keys` counts their keys.
 *
 * With `blocks` (a shared link: Session._plain_block is the same rule in Python),
 * a transaction block is taken whole or not at all: a bare MULTI, requests this
 * function takes, a bare EXEC, all in `data`, at most MAX_BLOCK requests, and
 * `n` still below `limit` after it (Session._shared_block's bound). Its replies
 * (+OK, +QUEUED..., EXEC's array) then pass as they come, so the proxy needs no
 * transaction state for it, and it reaches the link in one piece. A block that
 * does not qualify is given back (counts too) and the run stops before its MULTI.
 */
static void
release_block(SpecObject **b, int len, int undo)
{
    for (int i = 0; i < len; i++) {
        if (undo)
            b[i]->count--;
        Py_DECREF(b[i]);
    }
}

static PyObject *
rewrite_plain(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if ((argc != 6 && argc != 7) || !PyBytes_CheckExact(argv[0]) || !PyDict_CheckExact(argv[1]) ||
        !PyBytes_CheckExact(argv[3])) {
        PyErr_SetString(PyExc_TypeError, "rewrite_plain(data: bytes, specs: dict, mode: int, prefix: bytes, "
                                         "limit: int, max_bulk: int[, blocks: bool])");
        return NULL;
    }
    int blocks = argc == 7 ? PyObject_IsTrue(argv[6]) : 0;
    if (blocks < 0)
        return NULL;
    PyObject *data = argv[0], *specs = argv[1];
    long mode = PyLong_AsLong(argv[2]);
    Py_ssize_t limit = PyLong_AsSsize_t(argv[4]);
    Py_ssize_t max_bulk = PyLong_AsSsize_t(argv[5]);
    if (PyErr_Occurred())
        return NULL;
    const char *prefix = PyBytes_AS_STRING(argv[3]);
    Py_ssize_t plen = PyBytes_GET_SIZE(argv[3]);

    const char *base = PyBytes_AS_STRING(data);
    const char *end = base + PyBytes_GET_SIZE(data);
    const char *p = base;            /* start of the next request */
    Py_ssize_t n = 0, nkeys = 0, grow_by = 0;
    PyObject *result = NULL;
    Arg args_stack[STACK_ARGS], keys_stack[STACK_KEYS];
    Scratch av = {args_stack, STACK_ARGS, args_stack}, keys = {keys_stack, STACK_KEYS, keys_stack};
    /* the transaction block being taken: where it began, to give it back if it does not end here */
    SpecObject *blk[MAX_BLOCK];   /* its Specs (references held until taken or given back) */
    int in_block = 0, blk_len = 0;
    const char *blk_p = NULL;
    Py_ssize_t blk_n = 0, blk_nkeys = 0, blk_grow = 0;

    /* pass 1: which requests are taken, where their keys are, how long the result is */
    while (n < limit && p < end && *p == '*') {
        const char *q;
        Py_ssize_t count = read_len(p + 1, end, &q);
        if (count < 1 || count > MAX_ARGS)
            break;
        int complete = 1;
        for (Py_ssize_t i = 0; i < count; i++) {
            if (q >= end || *q != '$') {
                complete = 0;
                break;
            }
            const char *s;
            Py_ssize_t len = read_len(q + 1, end, &s);
            if (len < 0 || len > max_bulk || end - s < len + 2 || s[len] != '\r' || s[len + 1] != '\n') {
                complete = 0;
                break;
            }
            /* room for this argument only now that it is here: the array doubles,
             * up to the declared count, as arguments arrive */
            if (i >= av.cap && grow(&av, i + 1, count) < 0)
                goto fail;
            av.a[i].hdr = q;
            av.a[i].data = s;
            av.a[i].len = len;
            q = s + len + 2;
        }
        if (!complete)
            break;
        SpecObject *spec = (SpecObject *)find_spec(specs, av.a[0].data, av.a[0].len);
        if (spec == NULL) {
            if (PyErr_Occurred())
                goto fail;
            break;
        }
        int role = spec->role;
        if ((role && !(blocks && count == 1 && (role == MULTI_OPENS) != in_block)) ||
            (in_block && blk_len == MAX_BLOCK)) {
            Py_DECREF(spec);  /* EXEC outside a block, MULTI inside one, or a block too long */
            break;
        }
        if (role == MULTI_OPENS) {
            in_block = 1;
            blk_len = 0;
            blk_p = p;
            blk_n = n;
            blk_nkeys = nkeys;
            blk_grow = grow_by;
        }
        /* which arguments are keys (the same checks as keyspecs.py; a failing one
         * means an arity error, which the Python path reports). Spec_init already
         * guarantees every key index is below min_argc; the index checks below
         * repeat it so that no Spec, however built, makes this read past argv. */
        Py_ssize_t first = 1, last = 0, step = 1, here;
        int fits = count >= spec->min_argc, range = spec->first != 0;
        if (range) {
            first = spec->first;
            last = count + spec->lastkey;
            step = spec->step;
            fits = fits && first >= 1 && step >= 1 && last < count && last >= first && first < count;
            here = fits ? (last - first) / step + 1 : 0;
        }
        else {
            here = spec->nfixed;
            fits = fits && here >= 0 && here <= MAX_FIXED && (here == 0 || spec->fixed[here - 1] < count);
        }
        if (!fits) {
            Py_DECREF(spec);
            break;
        }
        if (grow(&keys, nkeys + here, PY_SSIZE_T_MAX / (Py_ssize_t)sizeof(Arg)) < 0) {
            Py_DECREF(spec);
            goto fail;
        }
        int ok = 1;
        for (Py_ssize_t k = 0; k < here && ok; k++) {
            Py_ssize_t at = range ? first + k * step : spec->fixed[k];
            if (at < 1 || at >= count) {  /* cannot happen with a checked Spec; never read past argv */
                ok = 0;
                break;
            }
            const Arg *a = &av.a[at];
            if (mode == 2)  /* strip: every key must carry the prefix, or Python refuses the request */
                ok = a->len >= plen && memcmp(a->data, prefix, plen) == 0;
            keys.a[nkeys + k] = *a;
        }
        if (!ok) {
            Py_DECREF(spec);
            break;
        }
        if (mode == 1 || mode == 2) {
            for (Py_ssize_t k = 0; k < here; k++) {
                Py_ssize_t len = keys.a[nkeys + k].len, now = mode == 1 ? len + plen : len - plen;
                grow_by += (now - len) + (digits(now) - digits(len));
            }
        }
        nkeys += here;
        spec->count++;
        if (in_block)
            blk[blk_len++] = spec;  /* its reference: released when the block is taken or given back */
        else
            Py_DECREF(spec);
        n++;
        p = q;
        if (role == EXEC_CLOSES) {
            in_block = 0;
            release_block(blk, blk_len, !(n < limit));
            blk_len = 0;
            if (!(n < limit)) {  /* past Session._shared_block's bound: given back */
                p = blk_p;
                n = blk_n;
                nkeys = blk_nkeys;
                grow_by = blk_grow;
                break;
            }
        }
    }
    if (in_block) {  /* the data (or `limit`) ended inside the block, or it did not qualify */
        release_block(blk, blk_len, 1);
        blk_len = 0;
        p = blk_p;
        n = blk_n;
        nkeys = blk_nkeys;
        grow_by = blk_grow;
    }

    /* pass 2: the server bytes */
    Py_ssize_t taken = p - base;
    if ((mode != 1 && mode != 2) || nkeys == 0) {
        if (taken == PyBytes_GET_SIZE(data)) {
            Py_INCREF(data);  /* nothing to rewrite, everything taken: the client's bytes as they came */
            result = data;
        }
        else
            result = PyBytes_FromStringAndSize(base, taken);
    }
    else {
        result = PyBytes_FromStringAndSize(NULL, taken + grow_by);
        if (result == NULL)
            goto fail;
        char *o = PyBytes_AS_STRING(result);
        const char *copied = base;
        for (Py_ssize_t k = 0; k < nkeys; k++) {
            const Arg *a = &keys.a[k];
            memcpy(o, copied, a->hdr - copied);
            o += a->hdr - copied;
            if (mode == 1) {
                o = put_len(o, a->len + plen);
                memcpy(o, prefix, plen);
                memcpy(o + plen, a->data, a->len);
                o += plen + a->len;
            }
            else {
                o = put_len(o, a->len - plen);
                memcpy(o, a->data + plen, a->len - plen);
                o += a->len - plen;
            }
            copied = a->data + a->len;
        }
        memcpy(o, copied, p - copied);
    }
    scratch_free(&av);
    scratch_free(&keys);
    if (result == NULL)
        return NULL;
    PyObject *t = PyTuple_New(4);
    if (t == NULL) {
        Py_DECREF(result);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, result);
    PyTuple_SET_ITEM(t, 1, PyLong_FromSsize_t(taken));
    PyTuple_SET_ITEM(t, 2, PyLong_FromSsize_t(n));
    PyTuple_SET_ITEM(t, 3, PyLong_FromSsize_t(nkeys));
    if (!PyTuple_GET_ITEM(t, 1) || !PyTuple_GET_ITEM(t, 2) || !PyTuple_GET_ITEM(t, 3)) {
        Py_DECREF(t);
        return NULL;
    }
    return t;

fail:
    release_block(blk, blk_len, 1);
    scratch_free(&av);
    scratch_free(&keys);
    return NULL;
}

/* ------------------------------------------------------------------ replies */

/* The end of the reply at `pos`: -1 incomplete, ASK_PYTHON for anything the
 * Python frame_end must look at (errors, unusual length syntax), so its
 * exceptions and messages stay the only ones. */
static Py_ssize_t
frame(const char *b, Py_ssize_t len, Py_ssize_t pos, int depth)
{
    if (pos >= len)
        return -1;
    const char *p = b + pos, *end = b + len, *nl = p;
    for (;;) {
        nl = memchr(nl, '\r', end - nl);
        if (nl == NULL || nl + 1 == end)
            return (len - pos > MAX_INLINE) ? ASK_PYTHON : -1;
        if (nl[1] == '\n')
            break;
        nl++;
    }
    switch (*p) {
    case '+': case '-': case ':': case ',': case '(': case '#': case '_':
        return (nl - b) + 2;
    default:
        break;
    }
    /* a length: optional '-', then digits, up to the CRLF */
    const char *q = p + 1;
    int neg = 0;
    if (q < nl && *q == '-') {
        neg = 1;
        q++;
    }
    if (q == nl || nl - q > 18)
        return ASK_PYTHON;
    long long v = 0;
    for (; q < nl; q++) {
        if (*q < '0' || *q > '9')
            return ASK_PYTHON;
        v = v * 10 + (*q - '0');
    }
    if (neg)
        v = -v;
    Py_ssize_t after = (nl - b) + 2;
    switch (*p) {
    case '$': case '=': case '!':
        if (v < 0)
            return after;
        return (after + v + 2 <= len) ? after + v + 2 : -1;
    case '*': case '~': case '>': case '%': case '|':
        if (v < 0)
            return after;
        if (depth > MAX_DEPTH)
            return ASK_PYTHON;
        if (*p == '%' || *p == '|')
            v *= 2;
        for (long long i = 0; i < v; i++) {
            after = frame(b, len, after, depth + 1);
            if (after < 0)
                return after;
        }
        if (*p == '|')
            return frame(b, len, after, depth + 1);
        return after;
    default:
        return ASK_PYTHON;
    }
}

static PyObject *
frame_end(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 2 || !PyBytes_Check(argv[0])) {
        PyErr_SetString(PyExc_TypeError, "frame_end(buf: bytes, pos: int)");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(argv[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    if (pos < 0)
        return PyLong_FromLong(ASK_PYTHON);
    return PyLong_FromSsize_t(frame(PyBytes_AS_STRING(argv[0]), PyBytes_GET_SIZE(argv[0]), pos, 0));
}

/* frame_run(buf, pos, limit, stop_at_push, pending) -> (end, m)
 *
 * stop_at_push is a bool or flags (1: stop at a push, 2: stop at an error).
 * Frames up to `limit` complete replies from `pos` while the head entry of
 * `pending` (a deque) is None (a reply passed on as it is), popping each, and
 * returns where they end and how many. Stops early at an incomplete reply, at
 * one the Python path must look at, or (stop_at_push) at a RESP3 push. */
static PyObject *
frame_run(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 5 || !PyBytes_Check(argv[0])) {
        PyErr_SetString(PyExc_TypeError,
                        "frame_run(buf: bytes, pos: int, limit: int, stop_at_push: bool, pending: deque)");
        return NULL;
    }
    const char *b = PyBytes_AS_STRING(argv[0]);
    Py_ssize_t len = PyBytes_GET_SIZE(argv[0]);
    Py_ssize_t pos = PyLong_AsSsize_t(argv[1]);
    Py_ssize_t limit = PyLong_AsSsize_t(argv[2]);
    /* stop_at_push: a bool, or flags: 1 stop at a push, 2 stop at an error ('-', '!';
     * a cluster route's Session looks at each for -MOVED / -ASK) */
    long flags = PyLong_AsLong(argv[3]);
    if (PyErr_Occurred())
        return NULL;
    int push = (flags & 1) != 0, errors = (flags & 2) != 0;
    PyObject *pending = argv[4];
    Py_ssize_t start = pos, m = 0;
    if (pos >= 0) {
        /* pending[0] and `del pending[0]` are O(1) for a deque, with no method look-up */
        while (m < limit && pos < len) {
            Py_ssize_t size = PySequence_Size(pending);
            if (size < 0)  /* not a sequence: its TypeError, not a result with an error set */
                return NULL;
            if (size == 0)
                break;
            PyObject *head = PySequence_GetItem(pending, 0);
            if (head == NULL)
                return NULL;
            int plain = head == Py_None;
            Py_DECREF(head);
            if (!plain || (push && b[pos] == '>') || (errors && (b[pos] == '-' || b[pos] == '!')))
                break;
            Py_ssize_t e = frame(b, len, pos, 0);
            if (e < 0)
                break;
            if (PySequence_DelItem(pending, 0) < 0)
                return NULL;
            pos = e;
            m++;
        }
    }
    if (!m)
        pos = start;
    PyObject *end_obj = PyLong_FromSsize_t(pos), *m_obj = PyLong_FromSsize_t(m);
    PyObject *t = (end_obj && m_obj) ? PyTuple_Pack(2, end_obj, m_obj) : NULL;
    Py_XDECREF(end_obj);
    Py_XDECREF(m_obj);
    return t;
}

/* ------------------------------------------------------------------ read_plain */

/* read_plain(data, pos, max_bulk, limit) -> (requests, end)
 *
 * The request reader's fast path (proxy/request_reader.py): the whole, canonically
 * encoded requests at data[pos:] (`*N` then N times `$L` and L bytes, each line
 * ending in CRLF, no sign or leading zero, 1 <= N, L <= max_bulk), at most `limit`
 * of them, as lists of bytes. It stops at the first request that is anything else
 * (incomplete, inline, non-canonical, too long: the Python reader then reads it by
 * Redis's rules, errors included), so it never decides anything differently.
 * A request's list is made only once all of its arguments are in the buffer, so
 * memory follows the bytes received, never a declared count. */
static PyObject *
read_plain(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 4 || !PyBytes_CheckExact(argv[0])) {
        PyErr_SetString(PyExc_TypeError, "read_plain(data: bytes, pos: int, max_bulk: int, limit: int)");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(argv[1]);
    Py_ssize_t max_bulk = PyLong_AsSsize_t(argv[2]);
    Py_ssize_t limit = PyLong_AsSsize_t(argv[3]);
    if (PyErr_Occurred())
        return NULL;
    const char *base = PyBytes_AS_STRING(argv[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(argv[0]);
    if (pos < 0 || pos > size) {
        PyErr_SetString(PyExc_ValueError, "pos out of range");
        return NULL;
    }
    const char *end = base + size, *p = base + pos;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    while (PyList_GET_SIZE(out) < limit && p < end && *p == '*') {
        const char *q;
        Py_ssize_t count = read_len(p + 1, end, &q);
        if (count < 1 || count > MAX_ARGS)
            break;
        /* walk first: is the whole request here, canonical? (no allocation yet) */
        const char *first = q;
        int complete = 1;
        for (Py_ssize_t i = 0; i < count; i++) {
            const char *s;
            Py_ssize_t len;
            if (q >= end || *q != '$' || (len = read_len(q + 1, end, &s)) < 0 || len > max_bulk
                    || end - s < len + 2 || s[len] != '\r' || s[len + 1] != '\n') {
                complete = 0;
                break;
            }
            q = s + len + 2;
        }
        if (!complete)
            break;
        /* every argument is in the buffer (at least 6 bytes each): build the list */
        PyObject *req = PyList_New(count);
        if (req == NULL)
            goto fail;
        q = first;
        for (Py_ssize_t i = 0; i < count; i++) {
            const char *s;
            Py_ssize_t len = read_len(q + 1, end, &s);
            PyObject *arg = PyBytes_FromStringAndSize(s, len);
            if (arg == NULL) {
                Py_DECREF(req);
                goto fail;
            }
            PyList_SET_ITEM(req, i, arg);
            q = s + len + 2;
        }
        int r = PyList_Append(out, req);
        Py_DECREF(req);
        if (r < 0)
            goto fail;
        p = q;
    }
    PyObject *end_obj = PyLong_FromSsize_t(p - base);
    if (end_obj == NULL)
        goto fail;
    PyObject *t = PyTuple_Pack(2, out, end_obj);
    Py_DECREF(end_obj);
    Py_DECREF(out);
    return t;
fail:
    Py_DECREF(out);
    return NULL;
}

/* ------------------------------------------------------------------ module */

static PyMethodDef methods[] = {
    {"rewrite_plain", (PyCFunction)(void (*)(void))rewrite_plain, METH_FASTCALL,
     "rewrite_plain(data, specs, mode, prefix, limit, max_bulk[, blocks]) -> (out, end, n, keys)"},
    {"frame_end", (PyCFunction)(void (*)(void))frame_end, METH_FASTCALL,
     "frame_end(buf, pos) -> end of the reply at pos, -1 incomplete, -2 ask the Python framer"},
    {"frame_run", (PyCFunction)(void (*)(void))frame_run, METH_FASTCALL,
     "frame_run(buf, pos, limit, stop_at_push, pending) -> (end, m)"},
    {"read_plain", (PyCFunction)(void (*)(void))read_plain, METH_FASTCALL,
     "read_plain(data, pos, max_bulk, limit) -> (requests, end): whole canonical requests, as lists"},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "proxy._speedups",
    "The per-request work of plain commands in C; the Python path stays the reference.",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&SpecType) < 0)
        return NULL;
    if (PyType_Ready(&HistType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    Py_INCREF(&SpecType);
    if (PyModule_AddObject(m, "Spec", (PyObject *)&SpecType) < 0) {
        Py_DECREF(&SpecType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&HistType);
    if (PyModule_AddObject(m, "Hist", (PyObject *)&HistType) < 0) {
        Py_DECREF(&HistType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "ASK_PYTHON", ASK_PYTHON) < 0 ||
        PyModule_AddIntConstant(m, "MULTI_OPENS", MULTI_OPENS) < 0 ||
        PyModule_AddIntConstant(m, "EXEC_CLOSES", EXEC_CLOSES) < 0 ||
        PyModule_AddIntConstant(m, "MAX_BLOCK", MAX_BLOCK) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
