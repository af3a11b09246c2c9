/* The JSON log batch encoder of sshspec.adapters.logs, in C.
 *
 * Why: with debug logging every transition writes a record (12 per benchmark
 * connection), and the Python loop that encodes a batch was most of what the
 * log cost (bench/). This does the same walk over the same flat queue and
 * returns the same bytes (tests/test_logs.py compares both with msgspec's
 * encoding of each LogRecord). Whatever it does not handle exactly as msgspec
 * would (a lone surrogate, an int beyond 64 bits, a type other than str, int
 * or None, a year outside 1000-9999) makes it return None, and the caller
 * takes the Python path, which knows every case.
 *
 * Queue(due, limit, step): Logger.add. Calling it with (records, *labels), a
 *   tuple of Kinds (whose .head is the record's fixed JSON, or None) and the
 *   values of Labels' fields in order, queues a step stamped with
 *   time.time_ns(); it calls due() when the first step is queued (which arms
 *   the flush timer) and when limit items wait. Its len() and items() are
 *   those of the Python queue, a flat list of step items per step (the time,
 *   the records, the labels), which it keeps in C arrays instead: no list
 *   growth, no int object per time. q.json(keys) encodes it.
 * json_batch(queued, keys) -> bytes | None: the same encoding of such a list.
 *   keys: tuple of bytes, each field's encoded name with its colon
 *   (b'"connectionId":', ...). A None value leaves its field out.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <string.h>
#include <time.h>

typedef struct {
    char *buf;
    Py_ssize_t len, cap;
} Out;

static int grow(Out *out, Py_ssize_t more) {
    if (out->len + more <= out->cap)
        return 0;
    Py_ssize_t cap = out->cap ? out->cap : 8192;
    while (cap < out->len + more)
        cap *= 2;
    char *buf = PyMem_Realloc(out->buf, cap);
    if (buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    out->buf = buf;
    out->cap = cap;
    return 0;
}

static int put(Out *out, const char *s, Py_ssize_t n) {
    if (grow(out, n) < 0)
        return -1;
    memcpy(out->buf + out->len, s, n);
    out->len += n;
    return 0;
}

/* A JSON string as msgspec writes it: '"' and '\\' escaped, control characters
 * as \b \t \n \f \r or \u00XX, everything else (DEL, non-ASCII) as UTF-8.
 * 1: written; 0: not representable here (a lone surrogate); -1: error set. */
static int put_str(Out *out, PyObject *text) {
    static const char hex[] = "0123456789abcdef";
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(text, &n);
    if (s == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    if (grow(out, 6 * n + 2) < 0)
        return -1;
    char *p = out->buf + out->len;
    *p++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *p++ = (char)c;
            continue;
        }
        *p++ = '\\';
        switch (c) {
        case '"': *p++ = '"'; break;
        case '\\': *p++ = '\\'; break;
        case '\b': *p++ = 'b'; break;
        case '\t': *p++ = 't'; break;
        case '\n': *p++ = 'n'; break;
        case '\f': *p++ = 'f'; break;
        case '\r': *p++ = 'r'; break;
        default:
            *p++ = 'u'; *p++ = '0'; *p++ = '0';
            *p++ = hex[c >> 4]; *p++ = hex[c & 15];
        }
    }
    *p++ = '"';
    out->len = p - out->buf;
    return 1;
}

/* A label's value: 1 written, 0 not handled here, -1 error set. */
static int put_value(Out *out, PyObject *value) {
    if (PyUnicode_CheckExact(value))
        return put_str(out, value);
    if (PyLong_CheckExact(value)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (overflow)
            return 0;
        if (v == -1 && PyErr_Occurred())
            return -1;
        char digits[24], *end = digits + sizeof digits, *p = end;
        unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
        do {
            *--p = (char)('0' + u % 10);
            u /= 10;
        } while (u);
        if (v < 0)
            *--p = '-';
        return put(out, p, end - p) < 0 ? -1 : 1;
    }
    return 0; /* bool, float, a subclass...: msgspec's rules, on the Python path */
}

/* The JSON lines of `steps` steps: times[i], then stride-spaced refs from
 * refs + i * stride: the records tuple, then the label values. */
static PyObject *encode(Py_ssize_t steps, const long long *times, PyObject *const *refs, Py_ssize_t stride,
                        PyObject *keys) {
    if (!PyTuple_Check(keys)) {
        PyErr_SetString(PyExc_TypeError, "keys must be a tuple of bytes");
        return NULL;
    }
    Py_ssize_t nkeys = PyTuple_GET_SIZE(keys);
    if (stride < nkeys + 1) {
        PyErr_Format(PyExc_ValueError, "%zd keys for steps of %zd label values", nkeys, stride - 1);
        return NULL;
    }
    for (Py_ssize_t k = 0; k < nkeys; k++) {
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(keys, k))) {
            PyErr_SetString(PyExc_TypeError, "keys must be a tuple of bytes");
            return NULL;
        }
    }
    static PyObject *head_name = NULL;
    if (head_name == NULL && (head_name = PyUnicode_InternFromString("head")) == NULL)
        return NULL;
    Out out = {NULL, 0, 0}, labels = {NULL, 0, 0};
    PyObject *result = NULL;
    if (grow(&out, steps * 512) < 0) /* a benchmark record is ~330 bytes */
        goto done;
    long long cached_second = -1;
    char stamp[64]; /* {"timestamp":"YYYY-MM-DDTHH:MM:SS. */
    int stamp_len = 0;

    for (Py_ssize_t i = 0; i < steps; i++) {
        PyObject *const *step = refs + i * stride;
        PyObject *records = step[0];
        long long ns = times[i];
        if (ns < 0 || !PyTuple_Check(records))
            goto fallback;
        long long second = ns / 1000000000LL;
        long micros = (long)(ns % 1000000000LL / 1000);
        if (second != cached_second) {
            time_t t = (time_t)second;
            struct tm tm;
            if (gmtime_r(&t, &tm) == NULL || tm.tm_year + 1900 < 1000 || tm.tm_year + 1900 > 9999)
                goto fallback;
            stamp_len = snprintf(stamp, sizeof stamp, "{\"timestamp\":\"%04d-%02d-%02dT%02d:%02d:%02d.",
                                 tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                                 tm.tm_sec);
            cached_second = second;
        }
        /* The step's labels, encoded once for all its records. */
        labels.len = 0;
        if (put(&labels, "{", 1) < 0)
            goto done;
        int first = 1;
        for (Py_ssize_t k = 0; k < nkeys; k++) {
            PyObject *value = step[1 + k];
            if (value == Py_None)
                continue;
            PyObject *key = PyTuple_GET_ITEM(keys, k);
            if ((!first && put(&labels, ",", 1) < 0) ||
                put(&labels, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key)) < 0)
                goto done;
            first = 0;
            int written = put_value(&labels, value);
            if (written < 0)
                goto done;
            if (written == 0)
                goto fallback;
        }
        if (put(&labels, "}}\n", 3) < 0)
            goto done;
        char fraction[7] = {'0' + micros / 100000, '0' + micros / 10000 % 10, '0' + micros / 1000 % 10,
                            '0' + micros / 100 % 10, '0' + micros / 10 % 10, '0' + micros % 10, 'Z'};
        for (Py_ssize_t r = 0; r < PyTuple_GET_SIZE(records); r++) {
            PyObject *head = PyObject_GetAttr(PyTuple_GET_ITEM(records, r), head_name);
            if (head == NULL)
                goto done;
            if (!PyBytes_CheckExact(head)) { /* None: a lone surrogate in the Kind */
                Py_DECREF(head);
                goto fallback;
            }
            int failed = put(&out, stamp, stamp_len) < 0 || put(&out, fraction, 7) < 0 ||
                         put(&out, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head)) < 0 ||
                         put(&out, labels.buf, labels.len) < 0;
            Py_DECREF(head);
            if (failed)
                goto done;
        }
    }
    result = PyBytes_FromStringAndSize(out.buf ? out.buf : "", out.len);
    goto done;
fallback:
    result = Py_NewRef(Py_None);
done: /* result is NULL if an error is set */
    PyMem_Free(out.buf);
    PyMem_Free(labels.buf);
    return result;
}

static PyObject *json_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2 || !PyList_Check(args[0]) || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "json_batch(queued: list, keys: tuple[bytes, ...])");
        return NULL;
    }
    PyObject *queued = args[0], *keys = args[1];
    Py_ssize_t stride = PyTuple_GET_SIZE(keys) + 2, total = PyList_GET_SIZE(queued);
    if (total % stride != 0) {
        PyErr_Format(PyExc_ValueError, "queued has %zd items, not a multiple of %zd", total, stride);
        return NULL;
    }
    Py_ssize_t steps = total / stride;
    if (steps == 0)
        return PyBytes_FromStringAndSize("", 0);
    long long *times = PyMem_Malloc(steps * sizeof *times);
    if (times == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < steps; i++) {
        PyObject *ns = PyList_GET_ITEM(queued, i * stride);
        int overflow = 0;
        times[i] = PyLong_CheckExact(ns) ? PyLong_AsLongLongAndOverflow(ns, &overflow) : -1;
        if (overflow || (times[i] == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            times[i] = -1; /* the Python path's business */
        }
    }
    PyObject *result = encode(steps, times, &PySequence_Fast_ITEMS(queued)[1], stride, keys);
    PyMem_Free(times);
    return result;
}

/* --- Queue ----------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *due;
    Py_ssize_t limit, step; /* in items of the flat list, as len() */
    Py_ssize_t steps, room;
    long long *times;
    PyObject **refs; /* step - 1 per step: the records, then the label values */
} Queue;

static PyObject *queue_call(PyObject *self_obj, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Queue *self = (Queue *)self_obj;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf), stride = self->step - 1;
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames)) {
        PyErr_SetString(PyExc_TypeError, "a step takes no keyword arguments");
        return NULL;
    }
    if (self->due == NULL) {
        PyErr_SetString(PyExc_ValueError, "the queue was cleared");
        return NULL;
    }
    if (nargs != stride) { /* a misaligned step would garble every record after it */
        PyErr_Format(PyExc_TypeError, "a step is its records and %zd label values, not %zd arguments",
                     stride - 1, nargs);
        return NULL;
    }
    if (self->steps == self->room) {
        Py_ssize_t room = self->room ? self->room * 2 : 64;
        long long *times = PyMem_Realloc(self->times, room * sizeof *times);
        if (times == NULL)
            return PyErr_NoMemory();
        self->times = times;
        PyObject **refs = PyMem_Realloc(self->refs, room * stride * sizeof *refs);
        if (refs == NULL)
            return PyErr_NoMemory();
        self->refs = refs;
        self->room = room;
    }
    struct timespec now;
    if (clock_gettime(CLOCK_REALTIME, &now) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    self->times[self->steps] = (long long)now.tv_sec * 1000000000LL + now.tv_nsec;
    PyObject **slot = self->refs + self->steps * stride;
    for (Py_ssize_t i = 0; i < stride; i++)
        slot[i] = Py_NewRef(args[i]);
    self->steps++;
    if (self->steps == 1 || self->steps * self->step >= self->limit)
        return PyObject_CallNoArgs(self->due);
    Py_RETURN_NONE;
}

static PyObject *queue_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    PyObject *due;
    Py_ssize_t limit, step;
    static char *names[] = {"due", "limit", "step", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Onn:Queue", names, &due, &limit, &step))
        return NULL;
    if (step < 2) {
        PyErr_SetString(PyExc_ValueError, "a step has at least its time and its records");
        return NULL;
    }
    Queue *self = (Queue *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = queue_call;
    self->due = Py_NewRef(due);
    self->limit = limit;
    self->step = step;
    return (PyObject *)self;
}

static int queue_clear(Queue *self) {
    Py_ssize_t n = self->steps * (self->step - 1);
    self->steps = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        Py_CLEAR(self->refs[i]);
    Py_CLEAR(self->due);
    return 0;
}

/* Only `due` (the logger's bound method: a cycle through the logger) is visited.
 * The steps hold tuples of Kinds and label values (str, int, None), which take
 * part in no cycle; visiting them cost every collection a walk over the whole
 * queue (callgrind: ~1.6k instructions per benchmark connection). Not visiting
 * a reference is safe: the collector then counts it as held from outside. */
static int queue_traverse(Queue *self, visitproc visit, void *arg) {
    Py_VISIT(self->due);
    return 0;
}

static void queue_dealloc(Queue *self) {
    PyObject_GC_UnTrack(self);
    queue_clear(self);
    PyMem_Free(self->times);
    PyMem_Free(self->refs);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t queue_len(Queue *self) { return self->steps * self->step; }

static PyObject *queue_json(Queue *self, PyObject *keys) {
    return encode(self->steps, self->times, self->refs, self->step - 1, keys);
}

static PyObject *queue_items(Queue *self, PyObject *unused) {
    (void)unused;
    Py_ssize_t stride = self->step - 1;
    PyObject *items = PyList_New(self->steps * self->step);
    if (items == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < self->steps; i++) {
        PyObject *ns = PyLong_FromLongLong(self->times[i]);
        if (ns == NULL) {
            Py_DECREF(items);
            return NULL;
        }
        PyList_SET_ITEM(items, i * self->step, ns);
        for (Py_ssize_t k = 0; k < stride; k++)
            PyList_SET_ITEM(items, i * self->step + 1 + k, Py_NewRef(self->refs[i * stride + k]));
    }
    return items;
}

static PyMethodDef queue_methods[] = {
    {"json", (PyCFunction)queue_json, METH_O, "json(keys) -> bytes | None: the queued records' JSON lines."},
    {"items", (PyCFunction)queue_items, METH_NOARGS, "items() -> list: the queue as the Python one keeps it."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods queue_as_sequence = {.sq_length = (lenfunc)queue_len};

static PyTypeObject QueueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sshspec.adapters._logbatch.Queue",
    .tp_doc = "Queue(due, limit, step): Logger.add, with the queued steps in C arrays.",
    .tp_basicsize = sizeof(Queue),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Queue, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = queue_new,
    .tp_dealloc = (destructor)queue_dealloc,
    .tp_traverse = (traverseproc)queue_traverse,
    .tp_clear = (inquiry)queue_clear,
    .tp_as_sequence = &queue_as_sequence,
    .tp_methods = queue_methods,
};

static PyMethodDef methods[] = {
    {"json_batch", (PyCFunction)(void (*)(void))json_batch, METH_FASTCALL,
     "json_batch(queued, keys) -> bytes | None: a queued batch's JSON lines (see sshspec.adapters.logs)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_logbatch", "The JSON log queue and batch encoder, in C.", 0, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__logbatch(void) {
    if (PyType_Ready(&QueueType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Queue", (PyObject *)&QueueType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
