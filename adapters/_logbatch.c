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
 * json_batch(queued, keys) -> bytes | None
 *   queued: list, len(keys) + 2 items per step: time.time_ns(), a tuple of
 *           Kinds (whose .head is the record's fixed JSON, or None), then the
 *           values of Labels' fields in order;
 *   keys:   tuple of bytes, each field's encoded name with its colon
 *           (b'"connectionId":', ...). A None value leaves its field out.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
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

static PyObject *json_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2 || !PyList_Check(args[0]) || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "json_batch(queued: list, keys: tuple[bytes, ...])");
        return NULL;
    }
    PyObject *queued = args[0], *keys = args[1];
    Py_ssize_t nkeys = PyTuple_GET_SIZE(keys), step = nkeys + 2;
    Py_ssize_t total = PyList_GET_SIZE(queued);
    if (total % step != 0) {
        PyErr_Format(PyExc_ValueError, "queued has %zd items, not a multiple of %zd", total, step);
        return NULL;
    }
    for (Py_ssize_t k = 0; k < nkeys; k++) {
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(keys, k))) {
            PyErr_SetString(PyExc_TypeError, "keys must be bytes");
            return NULL;
        }
    }
    PyObject *head_name = PyUnicode_InternFromString("head");
    if (head_name == NULL)
        return NULL;
    Out out = {NULL, 0, 0}, labels = {NULL, 0, 0};
    PyObject *result = NULL;
    if (grow(&out, total / step * 512) < 0) /* a benchmark record is ~330 bytes */
        goto done;
    long long cached_second = -1;
    char stamp[64]; /* {"timestamp":"YYYY-MM-DDTHH:MM:SS. */
    int stamp_len = 0;

    for (Py_ssize_t i = 0; i < total; i += step) {
        PyObject *ns_obj = PyList_GET_ITEM(queued, i);
        PyObject *records = PyList_GET_ITEM(queued, i + 1);
        if (!PyLong_CheckExact(ns_obj) || !PyTuple_Check(records))
            goto fallback;
        int overflow;
        long long ns = PyLong_AsLongLongAndOverflow(ns_obj, &overflow);
        if (overflow || ns < 0)
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
            PyObject *value = PyList_GET_ITEM(queued, i + 2 + k);
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
        for (Py_ssize_t r = 0; r < PyTuple_GET_SIZE(records); r++) {
            PyObject *head = PyObject_GetAttr(PyTuple_GET_ITEM(records, r), head_name);
            if (head == NULL)
                goto done;
            if (!PyBytes_CheckExact(head)) { /* None: a lone surrogate in the Kind */
                Py_DECREF(head);
                goto fallback;
            }
            char fraction[7] = {'0' + micros / 100000, '0' + micros / 10000 % 10, '0' + micros / 1000 % 10,
                                '0' + micros / 100 % 10, '0' + micros / 10 % 10, '0' + micros % 10, 'Z'};
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
    Py_DECREF(head_name);
    return result;
}

/* queue_step(queued, due, limit, step, records, *labels): Logger.add, as a partial
 * over its queue. Appends time.time_ns(), records and the labels' values (step
 * items in all) to queued, then calls due() if the queue was empty (the first step
 * arms the flush timer) or has reached limit items. */
static PyObject *queue_step(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs < 5 || !PyList_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "queue_step(queued: list, due, limit: int, step: int, records, *labels)");
        return NULL;
    }
    PyObject *queued = args[0];
    Py_ssize_t limit = PyLong_AsSsize_t(args[2]), step = PyLong_AsSsize_t(args[3]);
    if ((limit == -1 || step == -1) && PyErr_Occurred())
        return NULL;
    if (nargs - 5 != step - 2) { /* a misaligned step would garble every record after it */
        PyErr_Format(PyExc_TypeError, "a step has %zd label values, not %zd", nargs - 5, step - 2);
        return NULL;
    }
    struct timespec now;
    if (clock_gettime(CLOCK_REALTIME, &now) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    PyObject *ns = PyLong_FromLongLong((long long)now.tv_sec * 1000000000LL + now.tv_nsec);
    if (ns == NULL)
        return NULL;
    Py_ssize_t before = PyList_GET_SIZE(queued);
    int failed = PyList_Append(queued, ns);
    Py_DECREF(ns);
    for (Py_ssize_t i = 4; !failed && i < nargs; i++)
        failed = PyList_Append(queued, args[i]);
    if (failed)
        return NULL;
    if (before == 0 || PyList_GET_SIZE(queued) >= limit)
        return PyObject_CallNoArgs(args[1]);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"queue_step", (PyCFunction)(void (*)(void))queue_step, METH_FASTCALL,
     "queue_step(queued, due, limit, step, records, *labels): one step's records, queued (sshspec.adapters.logs)."},
    {"json_batch", (PyCFunction)(void (*)(void))json_batch, METH_FASTCALL,
     "json_batch(queued, keys) -> bytes | None: a queued batch's JSON lines (see sshspec.adapters.logs)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_logbatch", "The JSON log batch encoder, in C.", 0, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__logbatch(void) { return PyModule_Create(&module); }
