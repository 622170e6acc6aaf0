/* SSH packets sealed and opened with one C call each: chacha20-poly1305@openssh.com
 * and AES-CTR with hmac-sha2-*-etm@openssh.com, OpenSSL (the system's libcrypto)
 * driven from C.
 *
 * Through cryptography a chacha20-poly1305 packet is two nonce resets, three
 * ChaCha20 calls and a Poly1305 object (a new key and context each time): 5 us
 * of CPU for a packet of a few bytes, 12.5 us for a 32 KiB one, much of it call
 * overhead.  Here it is what OpenSSH's cipher-chachapoly-libcrypto.c does:
 * OpenSSL's ChaCha20 (EVP_chacha20, the library's vector code; its 16-byte IV
 * is the original ChaCha20's 64-bit block counter, little-endian, then the
 * 64-bit nonce, OpenSSH's big-endian sequence number), one context per key
 * re-keyed per packet; the Poly1305 tag by the C code below up to DONNA_MAX
 * bytes (the 64-bit "donna" form, constant-time; OpenSSL's set-up costs more
 * than it saves there) and by OpenSSL's Poly1305 (EVP_MAC) above: 0.7-1 us for
 * a small packet, 8-9 us for 32 KiB.  An EtM packet is seven calls through
 * cryptography (three cipher updates, the HMAC's copy, two updates and its
 * end); here one AES-CTR context runs on for the keys' life and one HMAC
 * context, keyed once, starts again per packet.  AES-GCM is not here: the
 * system's OpenSSL 3.0 lacks the AVX-512 GCM code of cryptography's own.
 *
 * tests/test_ssh_chachapoly.py and tests/test_ssh_native_packets.py hold this
 * module to cryptography's answers (hub/ssh/packet.py uses either).  Built by
 * setup.py against the system's libcrypto (Debian: libssl-dev) with
 * optional=True: without it the packet layer uses cryptography for every
 * packet.
 *
 * ChaChaPoly(key) with the 64 bytes of key material (K_2, then K_1), and
 * EtM(key, iv, digest, mac_key) for one direction, each have:
 *
 *   seal_into(seqnr, head, data, padding, out) -> int
 *       Frame padding_length || head || data || padding (len(padding) is the
 *       padding length), encrypt it (and, for ChaCha20, the length), append
 *       the tag: the wire bytes at the start of out (writable); their count.
 *
 *   open_into(seqnr, buf, pos, out) -> int
 *       The packet at buf[pos:]: 0 if fewer than 4 bytes are there; its
 *       packet_length L (> 0) if it is whole, authentic and no larger than
 *       out, its body then decrypted into out[:L]; otherwise -1 - L (not
 *       whole yet, a length the caller must check, or too large for out);
 *       None if the tag does not match (out is then untouched).
 *
 *   seal_data_into(seqnr, recipient, data, max_packet, padding, out) -> (count, used)
 *       All of data as CHANNEL_DATA packets to channel recipient, sealed one
 *       after another into out (see seal_data below).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <limits.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#define TAG_SIZE 16

static uint32_t load32_le(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t load64_le(const uint8_t *p)
{
    return (uint64_t)load32_le(p) | (uint64_t)load32_le(p + 4) << 32;
}

static void store32_le(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static void store32_be(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void store64_le(uint8_t *p, uint64_t v)
{
    store32_le(p, (uint32_t)v);
    store32_le(p + 4, (uint32_t)(v >> 32));
}

/* ---- Poly1305 ------------------------------------------------------------ */

typedef unsigned __int128 u128;
#define MASK44 0xfffffffffffULL
#define MASK42 0x3ffffffffffULL

static void poly1305(const uint8_t key[32], const uint8_t *m, size_t len, uint8_t tag[16])
{
    uint64_t t0 = load64_le(key), t1 = load64_le(key + 8);
    uint64_t r0 = t0 & 0xffc0fffffffULL;
    uint64_t r1 = ((t0 >> 44) | (t1 << 20)) & 0xfffffc0ffffULL;
    uint64_t r2 = (t1 >> 24) & 0x00ffffffc0fULL;
    uint64_t s1 = r1 * (5 << 2), s2 = r2 * (5 << 2);
    uint64_t h0 = 0, h1 = 0, h2 = 0, c;
    uint8_t last[16];

    while (len) {
        uint64_t hibit = (uint64_t)1 << 40;
        const uint8_t *p = m;
        if (len < 16) {  /* the final partial block: a 1 byte after it, then zeros */
            memset(last, 0, sizeof last);
            memcpy(last, m, len);
            last[len] = 1;
            hibit = 0;
            p = last;
        }
        t0 = load64_le(p);
        t1 = load64_le(p + 8);
        h0 += t0 & MASK44;
        h1 += ((t0 >> 44) | (t1 << 20)) & MASK44;
        h2 += ((t1 >> 24) & MASK42) | hibit;

        u128 d0 = (u128)h0 * r0 + (u128)h1 * s2 + (u128)h2 * s1;
        u128 d1 = (u128)h0 * r1 + (u128)h1 * r0 + (u128)h2 * s2;
        u128 d2 = (u128)h0 * r2 + (u128)h1 * r1 + (u128)h2 * r0;
        c = (uint64_t)(d0 >> 44); h0 = (uint64_t)d0 & MASK44;
        d1 += c; c = (uint64_t)(d1 >> 44); h1 = (uint64_t)d1 & MASK44;
        d2 += c; c = (uint64_t)(d2 >> 42); h2 = (uint64_t)d2 & MASK42;
        h0 += c * 5; c = h0 >> 44; h0 &= MASK44;
        h1 += c;

        if (len < 16)
            break;
        m += 16;
        len -= 16;
    }

    /* Full carry, then h - p if h >= p, in constant time. */
    c = h1 >> 44; h1 &= MASK44;
    h2 += c; c = h2 >> 42; h2 &= MASK42;
    h0 += c * 5; c = h0 >> 44; h0 &= MASK44;
    h1 += c; c = h1 >> 44; h1 &= MASK44;
    h2 += c; c = h2 >> 42; h2 &= MASK42;
    h0 += c * 5; c = h0 >> 44; h0 &= MASK44;
    h1 += c;

    uint64_t g0 = h0 + 5; c = g0 >> 44; g0 &= MASK44;
    uint64_t g1 = h1 + c; c = g1 >> 44; g1 &= MASK44;
    uint64_t g2 = h2 + c - ((uint64_t)1 << 42);
    c = (g2 >> 63) - 1;  /* all ones if h >= p */
    g0 &= c; g1 &= c; g2 &= c;
    c = ~c;
    h0 = (h0 & c) | g0;
    h1 = (h1 & c) | g1;
    h2 = (h2 & c) | g2;

    /* h + s mod 2^128 */
    t0 = load64_le(key + 16);
    t1 = load64_le(key + 24);
    h0 += t0 & MASK44; c = h0 >> 44; h0 &= MASK44;
    h1 += (((t0 >> 44) | (t1 << 20)) & MASK44) + c; c = h1 >> 44; h1 &= MASK44;
    h2 += ((t1 >> 24) & MASK42) + c; h2 &= MASK42;
    store64_le(tag, h0 | (h1 << 44));
    store64_le(tag + 8, (h1 >> 20) | (h2 << 24));
}

/* ---- the packet construction --------------------------------------------- */

/* OpenSSL's Poly1305 (vector code) for tags over more than DONNA_MAX bytes;
 * NULL where the library has none, and poly1305() above makes every tag. */
static EVP_MAC *poly1305_mac;
#define DONNA_MAX 512
static const size_t chacha_tag_size = TAG_SIZE;

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *main;    /* K_2: the body and the Poly1305 key */
    EVP_CIPHER_CTX *header;  /* K_1: the length */
    EVP_MAC_CTX *mac;        /* Poly1305 for long packets (or NULL) */
    int keyed;               /* __init__ succeeded */
} ChaChaPoly;

static PyObject *openssl_error(const char *what)
{
    PyErr_Format(PyExc_RuntimeError, "OpenSSL failed: %s", what);
    return NULL;
}

/* Put `ctx`'s keystream at block `counter` of the nonce `seqnr`: OpenSSH's
 * 16-byte IV, the block counter little-endian first, the sequence number
 * big-endian last (the original ChaCha20's 64-bit counter and nonce). */
static int start_stream(EVP_CIPHER_CTX *ctx, uint64_t seqnr, uint32_t counter)
{
    uint8_t iv[16] = {0};
    store32_le(iv, counter);
    for (int i = 0; i < 8; i++)
        iv[8 + i] = (uint8_t)(seqnr >> (56 - 8 * i));
    return EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, iv);
}

/* out = in XOR the keystream, where it stands (out may be in). */
static int xor_stream(EVP_CIPHER_CTX *ctx, uint8_t *out, const uint8_t *in, size_t len)
{
    int outl;
    while (len) {
        int n = len > INT_MAX / 2 ? INT_MAX / 2 : (int)len;
        if (!EVP_EncryptUpdate(ctx, out, &outl, in, n))
            return 0;
        out += n;
        in += n;
        len -= (size_t)n;
    }
    return 1;
}

/* The packet whose (clear or decrypted) length is at `p`, with `have` bytes of
 * it received: 1 if this path takes it whole; else 0 with `result` set to 0
 * (not even the length yet) or -1 - length (not whole yet, too large for
 * `out`, or a length the caller must check and refuse). */
static int whole_length(const uint8_t *p, size_t have, size_t block, size_t tag_size,
                        size_t out_len, uint32_t *length, PyObject **result)
{
    if (have < 4) {
        *result = PyLong_FromLong(0);
        return 0;
    }
    *length = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
    if (*length < block || *length % block || *length > out_len
        || have < 4 + (size_t)*length + tag_size) {
        *result = PyLong_FromLongLong(-1 - (long long)*length);
        return 0;
    }
    return 1;
}

/* One packet's payload and padding, where they lie. */
struct parts {
    const uint8_t *head, *data, *padding;
    size_t head_len, data_len, pad_len;
};

static struct parts parts_of(Py_buffer *head, Py_buffer *data, Py_buffer *padding)
{
    struct parts p = {head->buf, data->buf, padding->buf, (size_t)head->len, (size_t)data->len,
                      (size_t)padding->len};
    return p;
}

/* Seal one packet of `length` (packet_length) at `w`, whose room the caller
 * checked: 1, or 0 if OpenSSL failed (chacha_seal, etm_seal). */
typedef int (*seal_fn)(void *self, uint64_t seqnr, const struct parts *p, size_t length,
                       uint8_t *w);

/* padding_length || head || data || padding, encrypted by `ctx` from where
 * each part lies straight to `w` (no framed copy first). */
static int encrypt_parts(EVP_CIPHER_CTX *ctx, uint8_t *w, const struct parts *p)
{
    uint8_t first[1] = {(uint8_t)p->pad_len};
    return xor_stream(ctx, w, first, 1)
           && xor_stream(ctx, w + 1, p->head, p->head_len)
           && xor_stream(ctx, w + 1 + p->head_len, p->data, p->data_len)
           && xor_stream(ctx, w + 1 + p->head_len + p->data_len, p->padding, p->pad_len);
}

/* Open's end: None if `tag` is not the packet's, else its body decrypted by
 * `ctx` into `out` and its length. */
static PyObject *open_if_authentic(const uint8_t *tag, const uint8_t *sent, size_t tag_size,
                                   EVP_CIPHER_CTX *ctx, void *out, const uint8_t *body,
                                   uint32_t length, const char *what)
{
    if (CRYPTO_memcmp(tag, sent, tag_size))
        return Py_NewRef(Py_None);
    if (!xor_stream(ctx, out, body, length))
        return openssl_error(what);
    return PyLong_FromUnsignedLong(length);
}

/* The Poly1305 key of packet `seqnr` (block 0 of K_2's stream), leaving the
 * stream at block 1, where the body starts. */
static int poly_key(ChaChaPoly *self, uint64_t seqnr, uint8_t block0[64])
{
    static const uint8_t zeros[64];
    return start_stream(self->main, seqnr, 0) && xor_stream(self->main, block0, zeros, 64);
}

static int make_tag(ChaChaPoly *self, const uint8_t key[32], const uint8_t *m, size_t len,
                    uint8_t tag[TAG_SIZE])
{
    if (len <= DONNA_MAX || self->mac == NULL) {
        poly1305(key, m, len, tag);
        return 1;
    }
    size_t outl;
    return EVP_MAC_init(self->mac, key, 32, NULL) && EVP_MAC_update(self->mac, m, len)
           && EVP_MAC_final(self->mac, tag, &outl, TAG_SIZE);
}

/* Whether the object's __init__ ran to the end and keyed its contexts (tp_new
 * alone leaves them NULL, and OpenSSL must never see a NULL context). */
static int ready(int keyed)
{
    if (keyed)
        return 1;
    PyErr_SetString(PyExc_ValueError, "no key: the object was not initialised");
    return 0;
}

static int get_seqnr(PyObject *o, uint64_t *seqnr)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *seqnr = v;
    return 0;
}

/* seal_into(seqnr, head, data, padding, out): the arguments of every kind,
 * and the packet_length they make, checked against the padding rules of a
 * cipher of `block` bytes and the room in `out` for it and a `*tag_size` tag. */
static int seal_args(PyObject *const *args, Py_ssize_t nargs, size_t block,
                     const size_t *tag_size, uint64_t *seqnr, Py_buffer *head, Py_buffer *data,
                     Py_buffer *padding, Py_buffer *out, size_t *length)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "seal_into(seqnr, head, data, padding, out)");
        return -1;
    }
    if (get_seqnr(args[0], seqnr) < 0
        || PyObject_GetBuffer(args[1], head, PyBUF_SIMPLE) < 0
        || PyObject_GetBuffer(args[2], data, PyBUF_SIMPLE) < 0
        || PyObject_GetBuffer(args[3], padding, PyBUF_SIMPLE) < 0
        || PyObject_GetBuffer(args[4], out, PyBUF_WRITABLE) < 0)
        return -1;
    size_t pad = (size_t)padding->len;
    *length = 1 + (size_t)head->len + (size_t)data->len + pad;
    if (pad < 4 || pad > 255 || *length % block || *length > 0xffffffffu) {
        PyErr_SetString(PyExc_ValueError, "bad padding for the cipher's block size");
        return -1;
    }
    /* The tag's size read only now: taking a buffer may run Python code. */
    if ((size_t)out->len < 4 + *length + *tag_size) {
        PyErr_SetString(PyExc_ValueError, "output buffer too small");
        return -1;
    }
    return 0;
}

/* open_into(seqnr, buf, pos, out). */
static int open_args(PyObject *const *args, Py_ssize_t nargs, uint64_t *seqnr, Py_buffer *buf,
                     Py_ssize_t *pos, Py_buffer *out)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "open_into(seqnr, buf, pos, out)");
        return -1;
    }
    if (get_seqnr(args[0], seqnr) < 0)
        return -1;
    *pos = PyLong_AsSsize_t(args[2]);
    if (*pos == -1 && PyErr_Occurred())
        return -1;
    if (PyObject_GetBuffer(args[1], buf, PyBUF_SIMPLE) < 0
        || PyObject_GetBuffer(args[3], out, PyBUF_WRITABLE) < 0)
        return -1;
    if (*pos < 0 || *pos > buf->len) {
        PyErr_SetString(PyExc_ValueError, "position outside the buffer");
        return -1;
    }
    return 0;
}

/* Release the buffers that were taken (NULL or never filled: skipped). */
static void release_all(Py_buffer *a, Py_buffer *b, Py_buffer *c, Py_buffer *d)
{
    Py_buffer *all[] = {a, b, c, d};
    for (int i = 0; i < 4; i++)
        if (all[i] != NULL && all[i]->obj != NULL)
            PyBuffer_Release(all[i]);
}

static int ChaChaPoly_init(ChaChaPoly *self, PyObject *args, PyObject *kwds)
{
    Py_buffer key;
    static const uint8_t zero_iv[16];
    if (kwds && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "ChaChaPoly takes no keyword arguments");
        return -1;
    }
    self->keyed = 0;
    if (!PyArg_ParseTuple(args, "y*:ChaChaPoly", &key))
        return -1;
    if (key.len != 64) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "chacha20-poly1305 needs 64 bytes of key");
        return -1;
    }
    if (self->main == NULL)
        self->main = EVP_CIPHER_CTX_new();
    if (self->header == NULL)
        self->header = EVP_CIPHER_CTX_new();
    if (self->mac == NULL && poly1305_mac != NULL)
        self->mac = EVP_MAC_CTX_new(poly1305_mac);
    int ok = self->main != NULL && self->header != NULL
             && EVP_EncryptInit_ex(self->main, EVP_chacha20(), NULL, key.buf, zero_iv)
             && EVP_EncryptInit_ex(self->header, EVP_chacha20(), NULL,
                                   (const uint8_t *)key.buf + 32, zero_iv);
    PyBuffer_Release(&key);
    if (!ok) {
        openssl_error("ChaCha20 key set-up");
        return -1;
    }
    self->keyed = 1;
    return 0;
}

/* chacha20-poly1305's seal_fn. */
static int chacha_seal(void *obj, uint64_t seqnr, const struct parts *p, size_t length,
                       uint8_t *w)
{
    ChaChaPoly *self = obj;
    uint8_t len_plain[4];
    store32_be(len_plain, (uint32_t)length);
    uint8_t block0[64];
    int ok = start_stream(self->header, seqnr, 0) && xor_stream(self->header, w, len_plain, 4)
             && poly_key(self, seqnr, block0)
             && encrypt_parts(self->main, w + 4, p)
             && make_tag(self, block0, w, 4 + length, w + 4 + length);
    OPENSSL_cleanse(block0, sizeof block0);
    return ok;
}

/* seal_into(seqnr, head, data, padding, out) of either kind: `seal` frames and
 * seals the packet with a cipher of `block` bytes and a `*tag_size` tag. */
static PyObject *seal_one(void *self, int keyed, seal_fn seal, size_t block,
                          const size_t *tag_size, const char *what, PyObject *const *args,
                          Py_ssize_t nargs)
{
    uint64_t seqnr;
    Py_buffer head = {0}, data = {0}, padding = {0}, out = {0};
    PyObject *result = NULL;
    size_t length;
    if (!ready(keyed)
        || seal_args(args, nargs, block, tag_size, &seqnr, &head, &data, &padding, &out,
                     &length) < 0)
        goto done;
    struct parts p = parts_of(&head, &data, &padding);
    result = seal(self, seqnr, &p, length, out.buf) ? PyLong_FromSize_t(4 + length + *tag_size)
                                                    : openssl_error(what);
done:
    release_all(&head, &data, &padding, &out);
    return result;
}

static PyObject *ChaChaPoly_seal_into(ChaChaPoly *self, PyObject *const *args, Py_ssize_t nargs)
{
    return seal_one(self, self->keyed, chacha_seal, 8, &chacha_tag_size,
                    "chacha20-poly1305 seal", args, nargs);
}

static PyObject *ChaChaPoly_open_into(ChaChaPoly *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t seqnr;
    Py_ssize_t pos;
    Py_buffer buf = {0}, out = {0};
    PyObject *result = NULL;

    if (!ready(self->keyed) || open_args(args, nargs, &seqnr, &buf, &pos, &out) < 0)
        goto done;

    const uint8_t *p = (const uint8_t *)buf.buf + pos;
    size_t have = (size_t)(buf.len - pos);
    if (have < 4) {
        result = PyLong_FromLong(0);
        goto done;
    }
    uint8_t len_plain[4];
    if (!(start_stream(self->header, seqnr, 0) && xor_stream(self->header, len_plain, p, 4))) {
        openssl_error("chacha20-poly1305 length");
        goto done;
    }
    uint32_t length;
    if (!whole_length(len_plain, have, 8, TAG_SIZE, (size_t)out.len, &length, &result))
        goto done;
    uint8_t block0[64], tag[TAG_SIZE];
    int ok = poly_key(self, seqnr, block0) && make_tag(self, block0, p, 4 + (size_t)length, tag);
    OPENSSL_cleanse(block0, sizeof block0);
    if (!ok) {
        openssl_error("chacha20-poly1305 tag");
        goto done;
    }
    result = open_if_authentic(tag, p + 4 + length, TAG_SIZE, self->main, out.buf, p + 4,
                               length, "chacha20-poly1305 open");

done:
    release_all(&buf, &out, NULL, NULL);
    return result;
}

static void ChaChaPoly_dealloc(ChaChaPoly *self)
{
    EVP_CIPHER_CTX_free(self->main);  /* which wipes the key schedule */
    EVP_CIPHER_CTX_free(self->header);
    EVP_MAC_CTX_free(self->mac);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* seal_data_into(seqnr, recipient, data, max_packet, padding, out) -> (count, used):
 * all of `data` as SSH_MSG_CHANNEL_DATA packets to channel `recipient`, at
 * most `max_packet` bytes of data each, sealed one after another into `out`
 * as packets seqnr, seqnr + 1, ... (mod 2^32), each padded as seal_into pads
 * (4 to block + 3 bytes, taken in turn from `padding`).  One call for what a
 * channel writes from one read: the packets are the bytes seal_into would
 * make for each, given the same padding. */
static PyObject *seal_data(void *self, int keyed, seal_fn seal, size_t block,
                           const size_t *tag_size, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer data = {0}, padding = {0}, out = {0};
    PyObject *result = NULL;
    uint64_t seqnr;
    if (!ready(keyed))
        return NULL;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "seal_data_into(seqnr, recipient, data, max_packet, padding, out)");
        return NULL;
    }
    unsigned long recipient = PyLong_AsUnsignedLong(args[1]);
    Py_ssize_t max_packet = PyLong_AsSsize_t(args[3]);
    if (get_seqnr(args[0], &seqnr) < 0 || PyErr_Occurred())
        return NULL;
    if (recipient > 0xffffffffu || max_packet < 1 || max_packet > 0x7fffffff) {
        PyErr_SetString(PyExc_ValueError, "bad recipient channel or maximum packet size");
        return NULL;
    }
    if (PyObject_GetBuffer(args[2], &data, PyBUF_SIMPLE) < 0
        || PyObject_GetBuffer(args[4], &padding, PyBUF_SIMPLE) < 0
        || PyObject_GetBuffer(args[5], &out, PyBUF_WRITABLE) < 0)
        goto done;
    const uint8_t *d = data.buf, *pad_bytes = padding.buf;
    uint8_t *w = out.buf;
    size_t left = (size_t)data.len, pad_left = (size_t)padding.len, room = (size_t)out.len;
    size_t count = 0, used = 0;
    while (left) {
        size_t n = left < (size_t)max_packet ? left : (size_t)max_packet;
        uint8_t head[9] = {94};  /* SSH_MSG_CHANNEL_DATA, recipient, length */
        store32_be(head + 1, (uint32_t)recipient);
        store32_be(head + 5, (uint32_t)n);
        size_t pad = block - (9 + n + 1) % block;
        if (pad < 4)
            pad += block;
        size_t length = 1 + 9 + n + pad, total = 4 + length + *tag_size;
        if (pad > pad_left || total > room) {
            PyErr_SetString(PyExc_ValueError, pad > pad_left ? "not enough padding"
                                                             : "output buffer too small");
            goto done;
        }
        struct parts p = {head, d, pad_bytes, 9, n, pad};
        if (!seal(self, (uint32_t)(seqnr + count), &p, length, w)) {
            openssl_error("sealing channel data");
            goto done;
        }
        d += n;
        left -= n;
        pad_bytes += pad;
        pad_left -= pad;
        w += total;
        room -= total;
        used += total;
        count++;
    }
    result = Py_BuildValue("(nn)", (Py_ssize_t)count, (Py_ssize_t)used);
done:
    release_all(&data, &padding, &out, NULL);
    return result;
}

static PyObject *ChaChaPoly_seal_data_into(ChaChaPoly *self, PyObject *const *args,
                                           Py_ssize_t nargs)
{
    return seal_data(self, self->keyed, chacha_seal, 8, &chacha_tag_size, args, nargs);
}

/* The method table and type of a packet protection NAME: its NAME_init,
 * NAME_seal_into, NAME_open_into and NAME_dealloc above. */
#define PACKET_TYPE(NAME, DOC)                                                              \
    static PyMethodDef NAME##_methods[] = {                                                 \
        {"seal_into", (PyCFunction)(void (*)(void))NAME##_seal_into, METH_FASTCALL,         \
         "seal_into(seqnr, head, data, padding, out) -> wire length"},                      \
        {"open_into", (PyCFunction)(void (*)(void))NAME##_open_into, METH_FASTCALL,         \
         "open_into(seqnr, buf, pos, out) -> packet_length, 0, -1 - packet_length or None"}, \
        {"seal_data_into", (PyCFunction)(void (*)(void))NAME##_seal_data_into, METH_FASTCALL, \
         "seal_data_into(seqnr, recipient, data, max_packet, padding, out) -> (count, used)"}, \
        {NULL, NULL, 0, NULL},                                                              \
    };                                                                                      \
    static PyTypeObject NAME##Type = {                                                      \
        PyVarObject_HEAD_INIT(NULL, 0)                                                      \
        .tp_name = "hub.ssh._packets." #NAME,                                               \
        .tp_basicsize = sizeof(NAME),                                                       \
        .tp_flags = Py_TPFLAGS_DEFAULT,                                                     \
        .tp_doc = DOC,                                                                      \
        .tp_new = PyType_GenericNew,                                                        \
        .tp_init = (initproc)NAME##_init,                                                   \
        .tp_dealloc = (destructor)NAME##_dealloc,                                           \
        .tp_methods = NAME##_methods,                                                       \
    };

PACKET_TYPE(ChaChaPoly, "chacha20-poly1305@openssh.com packets for one key (64 bytes: K_2, K_1)")

/* ---- encrypt-then-MAC: AES-CTR and HMAC ---------------------------------- */

/* One OpenSSL context each for the life of the keys: the length in clear,
 * the body encrypted, then the HMAC over seqnr || length || ciphertext.
 * (AES-GCM stays with cryptography: its OpenSSL has the AVX-512 GCM code the
 * system's 3.0 lacks, 4 us for a 32 KiB packet against 6.7 here.) */

static EVP_MAC *hmac_mac;

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *cipher;  /* AES-CTR: the stream runs on across packets */
    EVP_MAC_CTX *mac;        /* HMAC, keyed once, re-initialised per packet */
    size_t mac_size;
    int keyed;               /* __init__ succeeded */
} EtM;

static const EVP_CIPHER *aes_ctr(Py_ssize_t key_len)
{
    switch (key_len) {
    case 16: return EVP_aes_128_ctr();
    case 24: return EVP_aes_192_ctr();
    case 32: return EVP_aes_256_ctr();
    default: return NULL;
    }
}

/* The HMAC of seqnr || m into `tag` (mac_size bytes). */
static int etm_mac(EtM *self, uint64_t seqnr, const uint8_t *m, size_t len, uint8_t *tag)
{
    uint8_t seq[4] = {(uint8_t)(seqnr >> 24), (uint8_t)(seqnr >> 16), (uint8_t)(seqnr >> 8),
                      (uint8_t)seqnr};
    size_t outl;
    /* No key: HMAC starts again from the keyed state. */
    return EVP_MAC_init(self->mac, NULL, 0, NULL) && EVP_MAC_update(self->mac, seq, 4)
           && EVP_MAC_update(self->mac, m, len)
           && EVP_MAC_final(self->mac, tag, &outl, EVP_MAX_MD_SIZE);
}

/* EtM(key, iv, digest, mac_key): AES-CTR with `key` (16, 24 or 32 bytes)
 * and the 16-byte counter block `iv`, HMAC with OpenSSL's digest `digest`
 * ("SHA256", "SHA512") keyed with `mac_key`. */
static int EtM_init(EtM *self, PyObject *args, PyObject *kwds)
{
    Py_buffer key, iv, mac_key;
    const char *digest;
    if (kwds && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "EtM takes no keyword arguments");
        return -1;
    }
    self->keyed = 0;
    if (!PyArg_ParseTuple(args, "y*y*sy*:EtM", &key, &iv, &digest, &mac_key))
        return -1;
    int rc = -1;
    const EVP_CIPHER *cipher = aes_ctr(key.len);
    if (cipher == NULL || iv.len != 16) {
        PyErr_SetString(PyExc_ValueError, "AES-CTR needs a 16, 24 or 32-byte key and 16-byte IV");
        goto done;
    }
    if (hmac_mac == NULL) {
        openssl_error("no HMAC");
        goto done;
    }
    if (self->cipher == NULL)
        self->cipher = EVP_CIPHER_CTX_new();
    if (self->mac == NULL)
        self->mac = EVP_MAC_CTX_new(hmac_mac);
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string("digest", (char *)digest, 0), OSSL_PARAM_END};
    if (self->cipher == NULL || self->mac == NULL
        || !EVP_EncryptInit_ex(self->cipher, cipher, NULL, key.buf, iv.buf)
        || !EVP_MAC_init(self->mac, mac_key.buf, (size_t)mac_key.len, params)) {
        openssl_error("encrypt-then-MAC key set-up");
        goto done;
    }
    self->mac_size = EVP_MAC_CTX_get_mac_size(self->mac);
    if (self->mac_size == 0 || self->mac_size > EVP_MAX_MD_SIZE) {
        openssl_error("HMAC size");
        goto done;
    }
    /* Each packet's HMAC starts again from the keyed state with
     * EVP_MAC_init(ctx, NULL, 0, NULL), which OpenSSL 3.0.0-3.0.2 accept but
     * ignore (openssl#17811): there the second tag would come out wrong and
     * every connection fail.  Two tags of the same input must agree, or
     * cryptography takes over (hub/ssh/packet.py). */
    uint8_t first[EVP_MAX_MD_SIZE], second[EVP_MAX_MD_SIZE];
    static const uint8_t probe[1] = {0};
    if (!etm_mac(self, 0, probe, 1, first) || !etm_mac(self, 0, probe, 1, second)
        || CRYPTO_memcmp(first, second, self->mac_size)) {
        openssl_error("HMAC does not start again per packet (OpenSSL 3.0.0-3.0.2)");
        goto done;
    }
    self->keyed = 1;
    rc = 0;
done:
    PyBuffer_Release(&key);
    PyBuffer_Release(&iv);
    PyBuffer_Release(&mac_key);
    return rc;
}

static int etm_seal(void *obj, uint64_t seqnr, const struct parts *p, size_t length, uint8_t *w)
{
    EtM *self = obj;
    store32_be(w, (uint32_t)length);
    return encrypt_parts(self->cipher, w + 4, p)
           && etm_mac(self, seqnr, w, 4 + length, w + 4 + length);
}

static PyObject *EtM_seal_into(EtM *self, PyObject *const *args, Py_ssize_t nargs)
{
    return seal_one(self, self->keyed, etm_seal, 16, &self->mac_size,
                    "encrypt-then-MAC seal", args, nargs);
}

static PyObject *EtM_open_into(EtM *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t seqnr;
    Py_ssize_t pos;
    Py_buffer buf = {0}, out = {0};
    PyObject *result = NULL;
    uint32_t length;
    uint8_t tag[EVP_MAX_MD_SIZE];
    if (!ready(self->keyed) || open_args(args, nargs, &seqnr, &buf, &pos, &out) < 0)
        goto done;
    const uint8_t *p = (const uint8_t *)buf.buf + pos;
    if (!whole_length(p, (size_t)(buf.len - pos), 16, self->mac_size, (size_t)out.len,
                      &length, &result))
        goto done;
    if (!etm_mac(self, seqnr, p, 4 + (size_t)length, tag)) {
        openssl_error("encrypt-then-MAC tag");
        goto done;
    }
    result = open_if_authentic(tag, p + 4 + length, self->mac_size, self->cipher, out.buf,
                               p + 4, length, "encrypt-then-MAC open");
done:
    release_all(&buf, &out, NULL, NULL);
    return result;
}

static void EtM_dealloc(EtM *self)
{
    EVP_CIPHER_CTX_free(self->cipher);
    EVP_MAC_CTX_free(self->mac);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *EtM_seal_data_into(EtM *self, PyObject *const *args, Py_ssize_t nargs)
{
    return seal_data(self, self->keyed, etm_seal, 16, &self->mac_size, args, nargs);
}

PACKET_TYPE(EtM, "aes*-ctr with hmac-sha2-*-etm@openssh.com, one direction")

/* poly1305(key, message) -> tag: for the tests. */
static PyObject *py_poly1305(PyObject *module, PyObject *args)
{
    Py_buffer key, msg;
    if (!PyArg_ParseTuple(args, "y*y*:poly1305", &key, &msg))
        return NULL;
    PyObject *result = NULL;
    if (key.len != 32) {
        PyErr_SetString(PyExc_ValueError, "Poly1305 needs a 32-byte key");
    } else {
        uint8_t tag[TAG_SIZE];
        poly1305(key.buf, msg.buf, (size_t)msg.len, tag);
        result = PyBytes_FromStringAndSize((const char *)tag, TAG_SIZE);
    }
    PyBuffer_Release(&key);
    PyBuffer_Release(&msg);
    return result;
}

static PyMethodDef module_methods[] = {
    {"poly1305", py_poly1305, METH_VARARGS, "poly1305(key, message) -> 16-byte tag"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "hub.ssh._packets",
    "SSH packets sealed and opened in one call each (see hub/ssh/packet.py)", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__packets(void)
{
    PyTypeObject *types[] = {&ChaChaPolyType, &EtMType};
    const char *names[] = {"ChaChaPoly", "EtM"};
    for (int i = 0; i < 2; i++)
        if (PyType_Ready(types[i]) < 0)
            return NULL;
    if (poly1305_mac == NULL)
        poly1305_mac = EVP_MAC_fetch(NULL, "POLY1305", NULL);  /* NULL: donna for all */
    if (hmac_mac == NULL)
        hmac_mac = EVP_MAC_fetch(NULL, "HMAC", NULL);  /* NULL: EtM() refuses */
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    for (int i = 0; i < 2; i++) {
        Py_INCREF(types[i]);
        if (PyModule_AddObject(m, names[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(types[i]);
            Py_DECREF(m);
            return NULL;
        }
    }
    return m;
}
