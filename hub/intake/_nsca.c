/* The NSCA decoder's hot path in C: whole data packets in, their fields out.
 *
 * hub/intake/nsca.py keeps the protocol (packet size, errors, age checks) and
 * a pure-Python twin of `unpack` (`unpack_py`), used when this module was not
 * built; tests/test_nsca_unpack.py holds the two to the same answers.  Method 1
 * (XOR with the IV and password, restarting each packet) is undone here with
 * the pad the decoder prepared; the mcrypt methods arrive already decrypted.
 *
 * unpack(buffer, size, pad) -> list of
 *     (version, crc, computed_crc, timestamp, code, host, service, output)
 * for each whole `size`-byte packet at the start of `buffer` (bytes or
 * bytearray); `pad` is None or the XOR pad (at least `size` bytes).  The names
 * and output are cut like nsca's strncpy (at most field size - 1 bytes, up to
 * the first NUL) and decoded as UTF-8 with "replace".
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <zlib.h>  /* crc32: nsca's CRC-32 is zlib's */

#define PACKET_SIZE 4304
#define LEGACY_PACKET_SIZE 720
#define HOST_AT 14
#define HOST_LEN 64
#define SERVICE_AT 78
#define SERVICE_LEN 128
#define OUTPUT_AT 206

static uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

static int be16s(const unsigned char *p)
{
    return (int16_t)(uint16_t)((unsigned)p[0] << 8 | p[1]);
}

/* A C string field as nsca copies it: at most `len` - 1 bytes, up to the NUL. */
static PyObject *field_text(const unsigned char *at, size_t len)
{
    const unsigned char *nul = memchr(at, 0, len - 1);
    Py_ssize_t n = nul ? (Py_ssize_t)(nul - at) : (Py_ssize_t)(len - 1);
    return PyUnicode_DecodeUTF8((const char *)at, n, "replace");
}

static PyObject *packet_fields(const unsigned char *raw, const unsigned char *pad,
                               size_t size)
{
    unsigned char plain[PACKET_SIZE];
    if (pad) {
        for (size_t i = 0; i < size; i += 8) {
            uint64_t a, b;
            memcpy(&a, raw + i, 8);
            memcpy(&b, pad + i, 8);
            a ^= b;
            memcpy(plain + i, &a, 8);
        }
    } else {
        memcpy(plain, raw, size);
    }
    uint32_t crc = be32(plain + 4);
    memset(plain + 4, 0, 4);  /* the CRC is computed with its own field zeroed */
    uint32_t computed = (uint32_t)crc32(0L, plain, (uInt)size);
    size_t output_len = size == PACKET_SIZE ? 4096 : 512;
    PyObject *host = field_text(plain + HOST_AT, HOST_LEN);
    PyObject *service = host ? field_text(plain + SERVICE_AT, SERVICE_LEN) : NULL;
    PyObject *output = service ? field_text(plain + OUTPUT_AT, output_len) : NULL;
    if (!output) {
        Py_XDECREF(host);
        Py_XDECREF(service);
        return NULL;
    }
    return Py_BuildValue("(ikkkiNNN)", be16s(plain), (unsigned long)crc,
                         (unsigned long)computed, (unsigned long)be32(plain + 8),
                         be16s(plain + 12), host, service, output);
}

static PyObject *unpack(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer data, pad = {0};
    Py_ssize_t size;
    PyObject *pad_obj, *packets = NULL;
    if (!PyArg_ParseTuple(args, "y*nO", &data, &size, &pad_obj))
        return NULL;
    if (size != PACKET_SIZE && size != LEGACY_PACKET_SIZE) {
        PyErr_Format(PyExc_ValueError, "packet size %zd is neither %d nor %d", size,
                     PACKET_SIZE, LEGACY_PACKET_SIZE);
        goto done;
    }
    if (pad_obj != Py_None) {
        if (PyObject_GetBuffer(pad_obj, &pad, PyBUF_SIMPLE) < 0)
            goto done;
        if (pad.len < size) {
            PyErr_Format(PyExc_ValueError, "XOR pad of %zd bytes for %zd-byte packets",
                         pad.len, size);
            goto done;
        }
    }
    Py_ssize_t count = data.len / size;
    packets = PyList_New(count);
    if (!packets)
        goto done;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *fields = packet_fields((const unsigned char *)data.buf + k * size,
                                         pad.buf, (size_t)size);
        if (!fields) {
            Py_CLEAR(packets);
            goto done;
        }
        PyList_SET_ITEM(packets, k, fields);
    }
done:
    if (pad.obj)
        PyBuffer_Release(&pad);
    PyBuffer_Release(&data);
    return packets;
}

static PyMethodDef methods[] = {
    {"unpack", unpack, METH_VARARGS,
     "unpack(buffer, size, pad) -> [(version, crc, computed, timestamp, code, host, "
     "service, output)] for each whole packet at the start of buffer."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_nsca",
    .m_doc = "The NSCA decoder's packet unpacking in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__nsca(void)
{
    return PyModule_Create(&module);
}
