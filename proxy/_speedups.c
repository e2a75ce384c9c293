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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>

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
} SpecObject;

static int
Spec_init(SpecObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fixed", "min_argc", "first", "lastkey", "step", NULL};
    PyObject *fixed;
    Py_ssize_t min_argc = 1, first = 0, lastkey = 0, step = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!|nnnn", kwlist, &PyTuple_Type, &fixed,
                                     &min_argc, &first, &lastkey, &step))
        return -1;
    Py_ssize_t n = PyTuple_GET_SIZE(fixed);
    if (n > MAX_FIXED) {
        PyErr_SetString(PyExc_ValueError, "too many fixed key positions");
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
    for (Py_ssize_t i = 0; i < n; i++) {
        long v = PyLong_AsLong(PyTuple_GET_ITEM(fixed, i));
        if (v == -1 && PyErr_Occurred())
            return -1;
        if (v < 1 || v > MAX_ARGS || (i && v <= self->fixed[i - 1])) {
            PyErr_SetString(PyExc_ValueError, "fixed positions must be increasing and >= 1");
            return -1;
        }
        self->fixed[i] = (int)v;
    }
    self->nfixed = (int)n;
    self->min_argc = min_argc < 1 ? 1 : min_argc;
    self->first = first;
    self->lastkey = lastkey;
    self->step = step;
    self->count = 0;
    return 0;
}

static PyMemberDef Spec_members[] = {
    {"count", T_PYSSIZET, offsetof(SpecObject, count), 0, "requests handled by the C path"},
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

static Arg *args_buf = NULL;      /* reused between calls (the GIL is held) */
static Py_ssize_t args_cap = 0;

typedef struct {
    char *p;
    Py_ssize_t len, cap;
} Out;

static int
out_reserve(Out *o, Py_ssize_t more)
{
    if (o->len + more <= o->cap)
        return 0;
    Py_ssize_t cap = o->cap ? o->cap : 256;
    while (cap < o->len + more)
        cap *= 2;
    char *p = PyMem_Realloc(o->p, cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->p = p;
    o->cap = cap;
    return 0;
}

static int
out_put(Out *o, const char *src, Py_ssize_t n)
{
    if (n <= 0)
        return 0;
    if (out_reserve(o, n) < 0)
        return -1;
    memcpy(o->p + o->len, src, n);
    o->len += n;
    return 0;
}

/* One key argument, re-encoded: "$<len>\r\n" + (prefix + key | key minus prefix). */
static int
out_key(Out *o, const Arg *a, int mode, const char *prefix, Py_ssize_t plen)
{
    Py_ssize_t newlen = mode == 1 ? a->len + plen : a->len - plen;
    char head[32];
    int h = snprintf(head, sizeof head, "$%zd\r\n", newlen);
    if (out_reserve(o, h + newlen) < 0)
        return -1;
    memcpy(o->p + o->len, head, h);
    o->len += h;
    if (mode == 1) {
        memcpy(o->p + o->len, prefix, plen);
        memcpy(o->p + o->len + plen, a->data, a->len);
    }
    else {
        memcpy(o->p + o->len, a->data + plen, newlen);
    }
    o->len += newlen;
    return 0;
}

/* rewrite_plain(data, specs, mode, prefix, limit, max_bulk) -> (out, end, n, keys)
 *
 * Requests at the start of `data` that are complete, canonically encoded arrays
 * of bulk strings whose name has a Spec in `specs` and whose argument count the
 * Spec accepts are rewritten (mode 0: keys as they are, 1: prefix added,
 * 2: prefix stripped, and a key without it stops the run) and encoded as
 * pack_command would encode them. Stops at the first other request, after
 * `limit` requests, or at the end. `out` holds the server bytes of the n
 * requests handled (data[:end] on the client side); `keys` counts rewritten keys.
 */
static PyObject *
rewrite_plain(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 6 || !PyBytes_CheckExact(argv[0]) || !PyDict_CheckExact(argv[1]) ||
        !PyBytes_CheckExact(argv[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "rewrite_plain(data: bytes, specs: dict, mode: int, prefix: bytes, limit: int, max_bulk: int)");
        return NULL;
    }
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
    const char *copied = base;       /* client bytes before this are in `out` */
    Out out = {NULL, 0, 0};
    Py_ssize_t n = 0, keys = 0;

    while (n < limit && p < end && *p == '*') {
        const char *q;
        Py_ssize_t count = read_len(p + 1, end, &q);
        if (count < 1 || count > MAX_ARGS)
            break;
        if (count > args_cap) {
            Py_ssize_t cap = args_cap ? args_cap : 64;
            while (cap < count)
                cap *= 2;
            Arg *b = PyMem_Realloc(args_buf, cap * sizeof(Arg));
            if (b == NULL) {
                PyMem_Free(out.p);
                return PyErr_NoMemory();
            }
            args_buf = b;
            args_cap = cap;
        }
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
            args_buf[i].hdr = q;
            args_buf[i].data = s;
            args_buf[i].len = len;
            q = s + len + 2;
        }
        if (!complete)
            break;

        PyObject *name = PyBytes_FromStringAndSize(args_buf[0].data, args_buf[0].len);
        if (name == NULL) {
            PyMem_Free(out.p);
            return NULL;
        }
        PyObject *found = PyDict_GetItemWithError(specs, name);  /* borrowed */
        Py_DECREF(name);
        if (found == NULL) {
            if (PyErr_Occurred()) {
                PyMem_Free(out.p);
                return NULL;
            }
            break;
        }
        if (!PyObject_TypeCheck(found, &SpecType))
            break;
        SpecObject *spec = (SpecObject *)found;

        /* which arguments are keys (the same checks as keyspecs.py; a failing one
         * means an arity error the Python path reports) */
        Py_ssize_t first, last, step;
        if (spec->first) {
            first = spec->first;
            last = count + spec->lastkey;
            step = spec->step;
            if (last >= count || last < first || first >= count)
                break;
        }
        else {
            if (count < spec->min_argc)
                break;
            first = 1;
            last = 0;
            step = 1;
        }
        if (mode == 2) {  /* strip: every key must carry the prefix, or Python refuses it */
            int ok = 1;
            if (spec->nfixed) {
                for (int k = 0; k < spec->nfixed && ok; k++) {
                    const Arg *a = &args_buf[spec->fixed[k]];
                    ok = a->len >= plen && memcmp(a->data, prefix, plen) == 0;
                }
            }
            else {
                for (Py_ssize_t i = first; i <= last && ok; i += step) {
                    const Arg *a = &args_buf[i];
                    ok = a->len >= plen && memcmp(a->data, prefix, plen) == 0;
                }
            }
            if (!ok)
                break;
        }
        if (mode) {
            if (spec->nfixed) {
                for (int k = 0; k < spec->nfixed; k++) {
                    const Arg *a = &args_buf[spec->fixed[k]];
                    if (out_put(&out, copied, a->hdr - copied) < 0 || out_key(&out, a, mode, prefix, plen) < 0) {
                        PyMem_Free(out.p);
                        return NULL;
                    }
                    copied = a->data + a->len;
                    keys++;
                }
            }
            else {
                for (Py_ssize_t i = first; i <= last; i += step) {
                    const Arg *a = &args_buf[i];
                    if (out_put(&out, copied, a->hdr - copied) < 0 || out_key(&out, a, mode, prefix, plen) < 0) {
                        PyMem_Free(out.p);
                        return NULL;
                    }
                    copied = a->data + a->len;
                    keys++;
                }
            }
        }
        else {
            keys += spec->nfixed ? spec->nfixed : (spec->first ? (last - first) / step + 1 : 0);
        }
        spec->count++;
        n++;
        p = q;
    }

    PyObject *result;
    if (out.p == NULL && copied == base && p == end) {
        Py_INCREF(data);  /* nothing rewritten, everything taken: the client's bytes as they came */
        result = data;
    }
    else {
        if (out_put(&out, copied, p - copied) < 0) {
            PyMem_Free(out.p);
            return NULL;
        }
        result = PyBytes_FromStringAndSize(out.p, out.len);
        PyMem_Free(out.p);
        if (result == NULL)
            return NULL;
    }
    return Py_BuildValue("(Nnnn)", result, (Py_ssize_t)(p - base), n, keys);
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

static PyObject *popleft_name;

/* frame_run(buf, pos, limit, stop_at_push, pending) -> (end, m)
 *
 * Frames up to `limit` complete replies from `pos` while the head entries of
 * `pending` (a deque) are None (replies passed on as they are), pops those m
 * entries, and returns where they end. Stops early at an incomplete reply, at
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
    int push = PyObject_IsTrue(argv[3]);
    if (PyErr_Occurred() || push < 0)
        return NULL;
    PyObject *pending = argv[4];
    Py_ssize_t start = pos, m = 0;
    if (pos >= 0 && limit > 0) {
        PyObject *it = PyObject_GetIter(pending);
        if (it == NULL)
            return NULL;
        while (m < limit && pos < len) {
            PyObject *entry = PyIter_Next(it);
            if (entry == NULL)
                break;
            int plain = entry == Py_None;
            Py_DECREF(entry);
            if (!plain || (push && b[pos] == '>'))
                break;
            Py_ssize_t e = frame(b, len, pos, 0);
            if (e < 0)
                break;
            pos = e;
            m++;
        }
        Py_DECREF(it);
        if (PyErr_Occurred())
            return NULL;
        for (Py_ssize_t i = 0; i < m; i++) {
            PyObject *r = PyObject_CallMethodNoArgs(pending, popleft_name);
            if (r == NULL)
                return NULL;
            Py_DECREF(r);
        }
    }
    if (!m)
        pos = start;
    return Py_BuildValue("(nn)", pos, m);
}

/* ------------------------------------------------------------------ module */

static PyMethodDef methods[] = {
    {"rewrite_plain", (PyCFunction)(void (*)(void))rewrite_plain, METH_FASTCALL,
     "rewrite_plain(data, specs, mode, prefix, limit, max_bulk) -> (out, end, n, keys)"},
    {"frame_end", (PyCFunction)(void (*)(void))frame_end, METH_FASTCALL,
     "frame_end(buf, pos) -> end of the reply at pos, -1 incomplete, -2 ask the Python framer"},
    {"frame_run", (PyCFunction)(void (*)(void))frame_run, METH_FASTCALL,
     "frame_run(buf, pos, limit, stop_at_push, pending) -> (end, m)"},
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
    popleft_name = PyUnicode_InternFromString("popleft");
    if (popleft_name == NULL)
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
    if (PyModule_AddIntConstant(m, "ASK_PYTHON", ASK_PYTHON) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
