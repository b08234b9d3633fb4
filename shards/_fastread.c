/* shards._fastread: the loader's read loop over a plain local shard, in C.
 *
 * read_run() does for a run of consecutive samples what shards.reader._plain_run does, with the
 * GIL released for the whole run: one preadv per sample of its first header, its .npy header,
 * its pixels (straight into the caller's buffer) and the JSON member with the headers around it
 * (a second read only for a JSON over 3 KiB), every tar header compared whole with
 * the one the writer makes (shards.writer.member_header), and the xxh3-128 of each member
 * compared with the manifest's. It accepts only what _read_plain accepts and stops at the first
 * sample where anything differs, returning what it read up to there: the caller hands that
 * sample to the general tar reader, which raises the precise error. The pixels of the sample it
 * stopped at may have been written to that sample's buffer; nothing else was.
 *
 * Two reader threads each in read_run at once overlap fully: the run holds no Python object.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define XXH_STATIC_LINKING_ONLY /* XXH3_state_t, XXH3_INITSTATE */
#include "xxhash.h"
#ifdef FASTREAD_X86_DISPATCH /* XXH3 picks SSE2, AVX2 or AVX-512 at run time, as the xxhash package does */
#include "xxh_x86dispatch.h"
#endif

#define BLOCK 512
#define NAME_MAX_ 100
#define SIZE_AT 124
#define CHKSUM_AT 148
#define TYPE_AT 156
#define TRAILER 4096 /* as shards.reader._TRAILER */
#define HEX 32

typedef struct {
    int wanted;         /* checked and returned; else only walked over (its headers checked) */
    Py_buffer view;     /* the pixels' buffer; view.obj NULL where they are not read */
    char digest[2][HEX]; /* expected hex xxh3-128 of the .npy and the .json data */
    /* out */
    long long at;       /* offset of the sample's first header */
    char key[NAME_MAX_ + 1];
    char *js;           /* the JSON data (malloc), wanted samples only */
    Py_ssize_t js_len;
} sample_t;

static long long padded(long long n) { return (n + BLOCK - 1) / BLOCK * BLOCK; }

/* The member (name, size) of a header block exactly as the writer makes it: 1, else 0. */
static int canonical(const unsigned char *blk, const unsigned char *tmpl, long ustar_sum,
                     char *name, long long *size) {
    if (blk[TYPE_AT] != '0')
        return 0;
    size_t n = strnlen((const char *)blk, NAME_MAX_);
    long sum = ustar_sum;
    for (size_t i = 0; i < n; i++) {
        if (blk[i] >= 0x80)
            return 0;
        sum += blk[i];
    }
    long long v = 0;
    for (int i = 0; i < 11; i++) {
        unsigned char c = blk[SIZE_AT + i];
        if (c < '0' || c > '7')
            return 0;
        v = v * 8 + (c - '0');
        sum += c;
    }
    unsigned char expect[BLOCK];
    memcpy(expect, tmpl, BLOCK);
    memcpy(expect, blk, n);
    memcpy(expect + SIZE_AT, blk + SIZE_AT, 11);
    expect[SIZE_AT + 11] = 0;
    char chk[8];
    snprintf(chk, sizeof chk, "%06lo", sum);
    memcpy(expect + CHKSUM_AT, chk, 7); /* six digits and their NUL; the eighth stays a space */
    if (memcmp(expect, blk, BLOCK) != 0)
        return 0;
    memcpy(name, blk, n);
    name[n] = 0;
    *size = v;
    return 1;
}

static void hex128(XXH128_hash_t h, char *out) {
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, h);
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 16; i++) {
        out[2 * i] = digits[c.digest[i] >> 4];
        out[2 * i + 1] = digits[c.digest[i] & 15];
    }
}

static ssize_t pread_full(int fd, void *buf, size_t n, off_t at) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, (char *)buf + got, n - got, at + got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return r < 0 && got == 0 ? -1 : (ssize_t)got;
        got += r;
    }
    return (ssize_t)got;
}

/* Read samples[0..count) from *at on; return how many passed, *at the offset after them. */
static Py_ssize_t run(int fd, long long *at, sample_t *s, Py_ssize_t count, const unsigned char *head,
                      Py_ssize_t head_len, Py_ssize_t pixels, const unsigned char *tmpl, long ustar_sum) {
    unsigned char block[BLOCK];
    unsigned char *got_head = malloc(head_len);
    char name[NAME_MAX_ + 1];
    long long npy_size = head_len + pixels, size;
    long long npy_end = BLOCK + padded(npy_size);
    long long pad = npy_end - BLOCK - npy_size;
    unsigned char *tail = malloc(pad + TRAILER);
    unsigned char *trailer = tail == NULL ? NULL : tail + pad;
    Py_ssize_t i = 0;
    struct stat st_file;
    long long file_size = fstat(fd, &st_file) == 0 ? (long long)st_file.st_size : -1;
    if (got_head == NULL || tail == NULL || file_size < 0)
        goto done;
    for (; i < count; i++) {
        sample_t *x = &s[i];
        x->at = *at;
        ssize_t t; /* bytes of the trailer read */
        if (x->view.obj != NULL) {
            /* One call: the header, the .npy header, the pixels into their buffer, the padding
             * and the trailer (the JSON member and the next header). */
            struct iovec iov[4] = {{block, BLOCK}, {got_head, head_len}, {x->view.buf, pixels}, {tail, pad + TRAILER}};
            ssize_t r;
            do
                r = preadv(fd, iov, 4, *at);
            while (r < 0 && errno == EINTR);
            if (r < BLOCK + npy_size) /* short: the general reader reads what is there */
                break;
            if (memcmp(got_head, head, head_len) != 0)
                break;
            t = r - (BLOCK + npy_size + pad);
        } else if (pread_full(fd, block, BLOCK, *at) != BLOCK) {
            break;
        } else {
            t = pread_full(fd, trailer, TRAILER, *at + npy_end);
        }
        if (!canonical(block, tmpl, ustar_sum, name, &size) || size != npy_size)
            break;
        size_t n = strlen(name);
        if (n < 4 || memcmp(name + n - 4, ".npy", 4) != 0)
            break;
        name[n - 4] = 0;
        if (strchr(name, '.') != NULL)
            break;
        char js_name[NAME_MAX_ + 1];
        long long js_size;
        if (t < BLOCK || !canonical(trailer, tmpl, ustar_sum, js_name, &js_size))
            break;
        if (strncmp(js_name, name, n - 4) != 0 || strcmp(js_name + n - 4, ".json") != 0)
            break;
        long long next_block = BLOCK + padded(js_size);
        if (*at + npy_end + next_block > file_size) /* a JSON larger than what is left of the file */
            break;
        const unsigned char *js;
        unsigned char *big = NULL;
        if (next_block <= t) {
            js = trailer + BLOCK;
        } else {
            /* A JSON that does not fit the trailer: read it and its padding whole. */
            big = malloc(next_block - BLOCK > 0 ? next_block - BLOCK : 1);
            if (big == NULL || pread_full(fd, big, next_block - BLOCK, *at + npy_end + BLOCK) != next_block - BLOCK) {
                free(big);
                break;
            }
            js = big;
        }
        if (x->wanted) {
            char hex[HEX];
            int ok = 1;
            if (x->view.obj != NULL) {
                XXH3_state_t st;
                XXH3_INITSTATE(&st);
                XXH3_128bits_reset(&st);
                XXH3_128bits_update(&st, got_head, head_len);
                XXH3_128bits_update(&st, x->view.buf, pixels);
                hex128(XXH3_128bits_digest(&st), hex);
                ok = memcmp(hex, x->digest[0], HEX) == 0;
            }
            if (ok) {
                hex128(XXH3_128bits(js, js_size), hex);
                ok = memcmp(hex, x->digest[1], HEX) == 0;
            }
            if (ok) {
                x->js = malloc(js_size > 0 ? js_size : 1);
                ok = x->js != NULL;
                if (ok) {
                    memcpy(x->js, js, js_size);
                    x->js_len = js_size;
                }
            }
            if (!ok) {
                free(big);
                break;
            }
        }
        free(big);
        memcpy(x->key, name, n - 4 + 1);
        *at += npy_end + next_block;
    }
done:
    free(got_head);
    free(tail);
    return i;
}

PyDoc_STRVAR(read_run_doc,
"read_run(fd, at, dests, digests, head, pixels, template, ustar_sum) -> (at, samples)\n\n"
"Read consecutive samples from offset ``at`` of a plain shard. ``digests[i]`` is the manifest's\n"
"pair of hex digests of sample ``i`` (None: a sample walked over, its headers checked, nothing\n"
"else); its pixels go to ``dests[i]``, a writable buffer of ``pixels`` bytes (None: not read).\n"
"Returns the offset after the last sample that passed and, for each that passed,\n"
"``(offset, key, json)`` (``json`` None where not wanted). Fewer samples than ``dests``: the\n"
"next one differs from what the writer writes, and the general reader takes it from there.");

static PyObject *read_run(PyObject *self, PyObject *args) {
    int fd;
    long long at;
    PyObject *dests, *digests;
    Py_buffer head, tmpl;
    Py_ssize_t pixels;
    long ustar_sum;
    if (!PyArg_ParseTuple(args, "iLOOy*ny*l:read_run", &fd, &at, &dests, &digests, &head, &pixels, &tmpl,
                          &ustar_sum))
        return NULL;
    PyObject *result = NULL;
    sample_t *s = NULL;
    Py_ssize_t count = 0, done = 0;
    if (tmpl.len != BLOCK) {
        PyErr_SetString(PyExc_ValueError, "read_run: the template must be one 512-byte block");
        goto out;
    }
    if (!PyList_Check(dests) || !PyList_Check(digests) || PyList_GET_SIZE(dests) != PyList_GET_SIZE(digests)) {
        PyErr_SetString(PyExc_TypeError, "read_run: dests and digests must be lists of one length");
        goto out;
    }
    count = PyList_GET_SIZE(dests);
    s = PyMem_Calloc(count ? count : 1, sizeof *s);
    if (s == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *d = PyList_GET_ITEM(dests, i);
        PyObject *pair = PyList_GET_ITEM(digests, i);
        if (d != Py_None) {
            if (PyObject_GetBuffer(d, &s[i].view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
                goto out;
            if (s[i].view.len != pixels) {
                PyErr_Format(PyExc_ValueError, "read_run: buffer %zd holds %zd bytes, not %zd", i, s[i].view.len, pixels);
                goto out;
            }
        }
        if (pair == Py_None) {
            if (d != Py_None) {
                PyErr_Format(PyExc_ValueError, "read_run: buffer %zd is for a sample not wanted", i);
                goto out;
            }
            continue;
        }
        s[i].wanted = 1;
        if (!PyTuple_Check(pair) && !PyList_Check(pair)) {
            PyErr_Format(PyExc_TypeError, "read_run: digests[%zd] is not a pair", i);
            goto out;
        }
        PyObject *seq = PySequence_Fast(pair, "digests");
        if (seq == NULL)
            goto out;
        int bad = PySequence_Fast_GET_SIZE(seq) != 2;
        for (int m = 0; !bad && m < 2; m++) {
            Py_ssize_t len;
            const char *hex = PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(seq, m), &len);
            if (hex == NULL || len != HEX)
                bad = 1;
            else
                memcpy(s[i].digest[m], hex, HEX);
        }
        Py_DECREF(seq);
        if (bad) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "read_run: digests[%zd] is not a pair of %d-character hex digests", i, HEX);
            goto out;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    done = run(fd, &at, s, count, head.buf, head.len, pixels, tmpl.buf, ustar_sum);
    Py_END_ALLOW_THREADS
    PyObject *list = PyList_New(done);
    if (list == NULL)
        goto out;
    for (Py_ssize_t i = 0; i < done; i++) {
        PyObject *js;
        if (s[i].wanted)
            js = PyBytes_FromStringAndSize(s[i].js, s[i].js_len);
        else
            js = Py_NewRef(Py_None);
        PyObject *item = js == NULL ? NULL : Py_BuildValue("(LsN)", s[i].at, s[i].key, js);
        if (item == NULL) {
            Py_DECREF(list);
            goto out;
        }
        PyList_SET_ITEM(list, i, item);
    }
    result = Py_BuildValue("(LN)", at, list);
out:
    if (s != NULL) {
        for (Py_ssize_t i = 0; i < count; i++) {
            if (s[i].view.obj != NULL)
                PyBuffer_Release(&s[i].view);
            free(s[i].js);
        }
        PyMem_Free(s);
    }
    PyBuffer_Release(&head);
    PyBuffer_Release(&tmpl);
    return result;
}

static PyMethodDef methods[] = {
    {"read_run", read_run, METH_VARARGS, read_run_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "shards._fastread",
    "The loader's read loop over a plain local shard, in C (see shards.reader._read_plain).", -1, methods,
};

PyMODINIT_FUNC PyInit__fastread(void) { return PyModule_Create(&module); }
