/*
 * fastlane.c - see fastlane.h.  The wire format and the checks are those of
 * docs/PROTOCOL.md section 5.2 and structauth/session.py; tests/test_fastlane.py
 * builds this file as a Python extension and checks it against Session.verify
 * message by message.
 */
#include "fastlane.h"
#include "blake2s.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define HEADER 31
#define PREFIX 15
#define TAG 16
#define TOPIC_SLOTS 32        /* per set; cleared when 3/4 full */
#define MAX_WINDOW 65535

static const char LABEL_CHAIN[] = "SA1 chain key";
static const char LABEL_MESSAGE[] = "SA1 message key";

typedef struct {
	char *slot[TOPIC_SLOTS];
	int used;
} topic_set;

typedef struct {
	int32_t epoch;            /* -1: empty */
	uint8_t raw[32];          /* the message key, to hand back to the host */
	uint32_t h[8];            /* BLAKE2s-128 state keyed with the epoch's message key */
} epoch_key;

typedef struct record {
	struct record *next;
	uint64_t hash;
	char *client_id;
	bool session;             /* a receive direction was handed over */
	uint8_t flags;
	uint8_t sid[8];
	double start, period, expires_at;
	int w, last_epoch;
	/* receive key ratchet: chain key of next_epoch; keys kept for [floor, next_epoch) */
	bool has_chain;
	uint8_t chain_key[32];
	int next_epoch, floor;
	int nkeys;
	epoch_key *keys;          /* ring, index epoch % nkeys */
	/* replay window: ring of wsize bits, bit seq % wsize (RFC 6479 style) */
	int64_t top;
	uint32_t wsize;
	uint64_t *bits;
	uint64_t routed;          /* messages routed here since the host last asked */
	topic_set pub, read;
} record;

static record **g_table;
static size_t g_buckets, g_count;
/* verify timing for the metrics: bucket upper bounds (seconds), counts, sum */
static double *g_bounds;
static uint64_t *g_hist;
static int g_nbounds;
static double g_hist_sum;
static uint64_t g_hist_count;
static bool g_tick_soon;

/* Fan-out sealing (structauth.fanout): on a broker that seals fan-out topics, every
 * routed message gets the trailer prefix || BLAKE2s-128(K_mac(i), prefix || len(topic) ||
 * topic || payload) of the current interval i.  The host hands over the interval's prefix
 * and MAC key once per interval (the first message after a boundary goes to Python,
 * which seals it and hands over the next); outside [from, until) nothing is routed here
 * unsealed or under a stale interval: the host gets the message instead. */
typedef struct {
	bool on;                  /* this broker seals: never route a message unsealed */
	bool valid;
	uint8_t prefix[PREFIX];
	b2s_state mac;            /* template keyed with the interval's MAC key */
	double from, until;       /* monotonic seconds the interval covers, with a margin */
} seal_state;
static seal_state g_seal;

/* --- small helpers -------------------------------------------------------------- */

static uint64_t hash_str(const char *s)
{
	uint64_t h = 1469598103934665603ull; /* FNV-1a */
	for(; *s; s++){
		h ^= (uint8_t)*s;
		h *= 1099511628211ull;
	}
	return h;
}

double fl_monotonic(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static bool set_has(const topic_set *set, const char *topic)
{
	uint64_t i = hash_str(topic) % TOPIC_SLOTS;
	for(int n = 0; n < TOPIC_SLOTS && set->slot[i]; n++, i = (i + 1) % TOPIC_SLOTS){
		if(!strcmp(set->slot[i], topic)) return true;
	}
	return false;
}

static void set_clear(topic_set *set)
{
	for(int i = 0; i < TOPIC_SLOTS; i++){
		free(set->slot[i]);
		set->slot[i] = NULL;
	}
	set->used = 0;
}

static void set_add(topic_set *set, const char *topic)
{
	if(set_has(set, topic)) return;
	if(set->used >= TOPIC_SLOTS * 3 / 4) set_clear(set); /* bounded: start over */
	char *copy = strdup(topic);
	if(copy == NULL) return; /* a cache miss later, nothing worse */
	uint64_t i = hash_str(topic) % TOPIC_SLOTS;
	while(set->slot[i]) i = (i + 1) % TOPIC_SLOTS;
	set->slot[i] = copy;
	set->used++;
}

static record *find(const char *client_id, uint64_t h)
{
	if(g_table == NULL) return NULL;
	for(record *r = g_table[h & (g_buckets - 1)]; r; r = r->next){
		if(r->hash == h && !strcmp(r->client_id, client_id)) return r;
	}
	return NULL;
}

static record *lookup(const char *client_id)
{
	return client_id ? find(client_id, hash_str(client_id)) : NULL;
}

static void wipe(void *p, size_t n)
{
	volatile uint8_t *v = p;
	while(n--) *v++ = 0;
}

static void free_record(record *r)
{
	if(r->keys) wipe(r->keys, sizeof(epoch_key) * (size_t)r->nkeys);
	wipe(r->chain_key, sizeof(r->chain_key));
	free(r->keys);
	free(r->bits);
	set_clear(&r->pub);
	set_clear(&r->read);
	free(r->client_id);
	free(r);
}

/* Unlink and return the record (caller frees), or NULL. */
static record *unlink_record(const char *client_id)
{
	if(g_table == NULL) return NULL;
	uint64_t h = hash_str(client_id);
	for(record **pp = &g_table[h & (g_buckets - 1)]; *pp; pp = &(*pp)->next){
		record *r = *pp;
		if(r->hash == h && !strcmp(r->client_id, client_id)){
			*pp = r->next;
			g_count--;
			return r;
		}
	}
	return NULL;
}

static bool insert(record *r)
{
	if(g_table == NULL || g_count >= g_buckets){
		size_t n = g_buckets ? g_buckets * 2 : 1024;
		record **t = calloc(n, sizeof(*t));
		if(t == NULL) return false;
		for(size_t i = 0; i < g_buckets; i++){
			for(record *e = g_table[i], *next; e; e = next){
				next = e->next;
				e->next = t[e->hash & (n - 1)];
				t[e->hash & (n - 1)] = e;
			}
		}
		free(g_table);
		g_table = t;
		g_buckets = n;
	}
	r->next = g_table[r->hash & (g_buckets - 1)];
	g_table[r->hash & (g_buckets - 1)] = r;
	g_count++;
	return true;
}

/* --- keys and window -------------------------------------------------------------- */

static void set_key(record *r, int epoch, const uint8_t message_key[32])
{
	b2s_state s;
	b2s_init(&s, TAG, message_key, 32);
	b2s_absorb_pending(&s);
	epoch_key *k = &r->keys[epoch % r->nkeys];
	k->epoch = epoch;
	memcpy(k->raw, message_key, 32);
	memcpy(k->h, s.h, sizeof(k->h));
	wipe(&s, sizeof(s));
}

/* Derive keys up to and including epoch (epoch >= next_epoch, chain present). */
static void ratchet_to(record *r, int epoch, bool keep)
{
	uint8_t mk[32], next[32];
	while(r->next_epoch <= epoch){
		if(keep){
			b2s(mk, 32, r->chain_key, 32, LABEL_MESSAGE, sizeof(LABEL_MESSAGE) - 1);
			set_key(r, r->next_epoch, mk);
		}
		b2s(next, 32, r->chain_key, 32, LABEL_CHAIN, sizeof(LABEL_CHAIN) - 1);
		memcpy(r->chain_key, next, 32);
		r->next_epoch++;
	}
	wipe(mk, sizeof(mk));
	wipe(next, sizeof(next));
}

/* Session._erase_receive_keys: keys below current - w go, the chain moves up. */
static void erase_below(record *r, int floor)
{
	r->floor = floor;
	for(int i = 0; i < r->nkeys; i++){
		if(r->keys[i].epoch >= 0 && r->keys[i].epoch < floor){
			wipe(&r->keys[i], sizeof(epoch_key));
			r->keys[i].epoch = -1;
		}
	}
	if(r->has_chain && r->next_epoch < floor) ratchet_to(r, floor - 1, false);
}

static inline bool bit_get(const record *r, int64_t seq)
{
	uint64_t i = (uint64_t)seq % r->wsize;
	return (r->bits[i / 64] >> (i % 64)) & 1;
}

static inline void bit_put(record *r, int64_t seq, bool on)
{
	uint64_t i = (uint64_t)seq % r->wsize;
	if(on) r->bits[i / 64] |= 1ull << (i % 64);
	else r->bits[i / 64] &= ~(1ull << (i % 64));
}

static void window_commit(record *r, int64_t seq)
{
	if(seq > r->top){
		if(seq - r->top >= (int64_t)r->wsize){
			memset(r->bits, 0, sizeof(uint64_t) * ((r->wsize + 63) / 64));
		}else{
			for(int64_t q = r->top + 1; q < seq; q++) bit_put(r, q, false);
		}
		r->top = seq;
	}
	bit_put(r, seq, true);
}

__attribute__((format(printf, 3, 4)))
static int reject(fl_result *out, const char *reason, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	out->reason = reason;
	vsnprintf(out->detail, sizeof(out->detail), fmt, ap);
	va_end(ap);
	return FL_REJECT;
}

static inline uint32_t be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* --- the per-message path ------------------------------------------------------------ */

/* hdr: the 31-byte header; body: the payload without it (len bytes). */
static int verify(record *r, const char *topic, size_t tlen, const uint8_t *hdr,
		const uint8_t *body, uint32_t len, double now, fl_result *out)
{
	if(hdr[0] != r->flags || memcmp(hdr + 1, r->sid, 8)) return FL_PASS;
	int epoch = (int)((uint32_t)hdr[9] << 8 | hdr[10]);
	int64_t seq = be32(hdr + 11);

	if(now >= r->expires_at){
		return reject(out, "session_expired", "session lifetime exceeded");
	}
	int current = now > r->start ? (int)((now - r->start) / r->period) : 0;
	if(epoch > current + r->w || epoch < current - r->w || epoch > r->last_epoch){
		return reject(out, "epoch_out_of_window", "epoch %d outside %d±%d", epoch, current, r->w);
	}
	if(seq <= r->top){
		int64_t behind = r->top - seq;
		if(behind >= (int64_t)r->wsize){
			return reject(out, "replayed", "sequence %lld is %lld behind the newest, outside "
					"the replay window", (long long)seq, (long long)behind);
		}
		if(bit_get(r, seq)) return reject(out, "replayed", "sequence %lld already seen", (long long)seq);
	}
	if(current - r->w > r->floor) erase_below(r, current - r->w);
	epoch_key *k = &r->keys[epoch % r->nkeys];
	if(k->epoch != epoch){
		if(epoch < r->next_epoch || !r->has_chain){
			return reject(out, "epoch_out_of_window", "keys for epoch %d were erased", epoch);
		}
		ratchet_to(r, epoch, true);
	}
	b2s_state s;
	memcpy(s.h, k->h, sizeof(s.h));
	s.t[0] = 64;
	s.t[1] = 0;
	s.buflen = 0;
	s.outlen = TAG;
	uint8_t n[2] = {(uint8_t)(tlen >> 8), (uint8_t)tlen};
	uint8_t tag[TAG];
	b2s_update(&s, hdr, PREFIX);
	b2s_update(&s, n, 2);
	b2s_update(&s, topic, tlen);
	b2s_update(&s, body, len);
	b2s_final(&s, tag);
	uint8_t diff = 0;
	for(int i = 0; i < TAG; i++) diff |= (uint8_t)(tag[i] ^ hdr[PREFIX + i]);
	if(diff) return reject(out, "bad_tag", "tag does not match");
	window_commit(r, seq);
	out->body_len = len;
	out->epoch = epoch;
	out->seq = seq;
	return FL_VERIFIED;
}

static bool seal_ready(double now)
{
	return !g_seal.on || (g_seal.valid && now >= g_seal.from && now < g_seal.until);
}

bool fl_sealing(void)
{
	return g_seal.on;
}

void fl_seal(const char *topic, const uint8_t *body, uint32_t len, uint8_t trailer[HEADER])
{
	size_t tlen = strlen(topic);
	uint8_t tl[2] = {(uint8_t)(tlen >> 8), (uint8_t)tlen};
	b2s_state s = g_seal.mac;
	memcpy(trailer, g_seal.prefix, PREFIX);
	b2s_update(&s, g_seal.prefix, PREFIX);
	b2s_update(&s, tl, 2);
	b2s_update(&s, topic, tlen);
	b2s_update(&s, body, len);
	b2s_final(&s, trailer + PREFIX);
	wipe(&s, sizeof s);
}

int fl_message(const char *client_id, const char *topic, const uint8_t *payload,
		uint32_t len, double now, fl_result *out)
{
	record *r = lookup(client_id);
	size_t tlen = topic ? strlen(topic) : 0;
	if(r == NULL || !r->session || len < HEADER || topic == NULL || tlen > 0xFFFF){
		return FL_PASS;
	}
	double t0 = g_hist ? fl_monotonic() : 0;
	int rc = verify(r, topic, tlen, payload + len - HEADER, payload, len - HEADER, now, out);
	/* a topic judged before routes here, unless it must be sealed and this interval's
	 * key has not been handed over yet: then the host seals it (and hands it over) */
	if(rc == FL_VERIFIED && set_has(&r->pub, topic) && seal_ready(now)){
		r->routed++;
		rc = FL_ROUTE;
	}
	if(g_hist && rc != FL_PASS){
		double dt = fl_monotonic() - t0;
		int b = 0;
		while(b < g_nbounds && dt > g_bounds[b]) b++;
		g_hist[b]++;
		g_hist_sum += dt;
		g_hist_count++;
	}
	return rc;
}

void fl_cache_topic(const char *client_id, const char *topic)
{
	record *r = lookup(client_id);
	if(r) set_add(&r->pub, topic);
}

bool fl_known(const char *client_id)
{
	return lookup(client_id) != NULL;
}

bool fl_read_cached(const char *client_id, const char *topic)
{
	record *r = lookup(client_id);
	return r && topic && set_has(&r->read, topic);
}

void fl_cache_read(const char *client_id, const char *topic)
{
	record *r = lookup(client_id);
	if(r && topic) set_add(&r->read, topic);
}

bool fl_take_tick_soon(void)
{
	bool soon = g_tick_soon;
	g_tick_soon = false;
	return soon;
}

/* --- the Python module ----------------------------------------------------------------- */

static PyObject *fast_tick_soon(PyObject *self, PyObject *unused)
{
	(void)self; (void)unused;
	g_tick_soon = true;
	Py_RETURN_NONE;
}

static PyObject *fast_open(PyObject *self, PyObject *args)
{
	const char *cid;
	Py_buffer sid, mask;
	int flags, w, last_epoch, next_epoch, floor;
	unsigned int wsize;
	double start, period, expires_at;
	long long top;
	PyObject *chain, *keys;
	(void)self;

	if(!PyArg_ParseTuple(args, "sy*iddidIiLy*OiiO:open", &cid, &sid, &flags, &start, &period,
			&w, &expires_at, &last_epoch, &wsize, &top, &mask, &chain, &next_epoch, &floor, &keys)){
		return NULL;
	}
	record *r = NULL;
	PyObject *seq = NULL, *result = NULL;
	const char *bad = NULL;
	if(sid.len != 8) bad = "session id must be 8 bytes";
	else if(flags < 0 || flags > 255) bad = "flags out of range";
	else if(period <= 0 || w < 0 || w > 16) bad = "bad epoch parameters";
	else if(wsize < 32 || wsize > MAX_WINDOW) bad = "window size outside 32..65535";
	else if(top < -1 || top > 0xFFFFFFFFll) bad = "window top out of range";
	else if(chain != Py_None && (!PyBytes_Check(chain) || PyBytes_GET_SIZE(chain) != 32)) bad = "chain key must be 32 bytes or None";
	else if(next_epoch < 0 || floor < 0) bad = "negative epoch";
	if(bad){
		PyErr_SetString(PyExc_ValueError, bad);
		goto done;
	}
	seq = PySequence_Fast(keys, "keys must be a sequence of (epoch, message key)");
	if(seq == NULL) goto done;
	r = calloc(1, sizeof(*r));
	if(r == NULL) goto nomem;
	r->client_id = strdup(cid);
	r->nkeys = 2 * w + 2;
	r->keys = calloc((size_t)r->nkeys, sizeof(epoch_key));
	r->wsize = wsize;
	r->bits = calloc((wsize + 63) / 64, sizeof(uint64_t));
	if(!r->client_id || !r->keys || !r->bits) goto nomem;
	for(int i = 0; i < r->nkeys; i++) r->keys[i].epoch = -1;
	r->hash = hash_str(cid);
	r->session = true;
	r->flags = (uint8_t)flags;
	memcpy(r->sid, sid.buf, 8);
	r->start = start;
	r->period = period;
	r->w = w;
	r->expires_at = expires_at;
	r->last_epoch = last_epoch;
	r->has_chain = chain != Py_None;
	if(r->has_chain) memcpy(r->chain_key, PyBytes_AS_STRING(chain), 32);
	r->next_epoch = next_epoch;
	r->floor = floor;
	for(Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++){
		PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
		int epoch;
		Py_buffer mk;
		if(!PyArg_ParseTuple(item, "iy*:key", &epoch, &mk)) goto done;
		bool ok = mk.len == 32 && epoch >= 0 && epoch < next_epoch;
		/* the ring keeps the newest 2w+2 epochs; older ones would be erased anyway */
		if(ok && epoch >= next_epoch - r->nkeys && epoch >= floor) set_key(r, epoch, mk.buf);
		PyBuffer_Release(&mk);
		if(!ok){
			PyErr_SetString(PyExc_ValueError, "bad (epoch, message key) pair");
			goto done;
		}
	}
	r->top = top;
	const uint8_t *m = mask.buf;
	for(int64_t i = 0; i < (int64_t)wsize && i / 8 < mask.len && top - i >= 0; i++){
		if((m[i / 8] >> (i % 8)) & 1) bit_put(r, top - i, true);
	}
	record *old = unlink_record(cid);
	if(old) free_record(old);
	if(!insert(r)) goto nomem;
	r = NULL;
	result = Py_NewRef(Py_None);
	goto done;
nomem:
	PyErr_NoMemory();
done:
	if(r) free_record(r);
	Py_XDECREF(seq);
	PyBuffer_Release(&sid);
	PyBuffer_Release(&mask);
	return result;
}

/* close(client_id) -> None, or the receive state to hand back to the Python session:
 * (top, mask bytes little-endian, chain key | None, next_epoch, floor,
 *  [(epoch, message key)] for the epochs still kept). */
static PyObject *fast_close(PyObject *self, PyObject *arg)
{
	(void)self;
	const char *cid = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
	if(cid == NULL){
		if(!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "client id must be a str");
		return NULL;
	}
	record *r = unlink_record(cid);
	if(r == NULL) Py_RETURN_NONE;
	PyObject *res = NULL;
	if(r->session){
		size_t nbytes = (r->wsize + 7) / 8;
		uint8_t *mask = calloc(nbytes, 1);
		if(mask == NULL){
			free_record(r);
			return PyErr_NoMemory();
		}
		for(int64_t i = 0; i < (int64_t)r->wsize && r->top - i >= 0; i++){
			if(bit_get(r, r->top - i)) mask[i / 8] |= (uint8_t)(1u << (i % 8));
		}
		PyObject *keys = PyList_New(0);
		for(int i = 0; keys && i < r->nkeys; i++){
			if(r->keys[i].epoch < 0) continue;
			PyObject *pair = Py_BuildValue("(iy#)", r->keys[i].epoch, (const char *)r->keys[i].raw,
					(Py_ssize_t)32);
			if(pair == NULL || PyList_Append(keys, pair)) Py_CLEAR(keys);
			Py_XDECREF(pair);
		}
		if(keys){
			res = Py_BuildValue("(Ly#NiiN)", (long long)r->top, (const char *)mask, (Py_ssize_t)nbytes,
					r->has_chain ? PyBytes_FromStringAndSize((const char *)r->chain_key, 32)
					: Py_NewRef(Py_None), r->next_epoch, r->floor, keys);
		}
		free(mask);
	}else{
		res = Py_NewRef(Py_None);
	}
	free_record(r);
	return res;
}

static PyObject *fast_forget_topics(PyObject *self, PyObject *arg)
{
	(void)self;
	if(arg == Py_None){
		for(size_t i = 0; i < g_buckets; i++){
			for(record *r = g_table[i]; r; r = r->next){
				set_clear(&r->pub);
				set_clear(&r->read);
			}
		}
		Py_RETURN_NONE;
	}
	const char *cid = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
	if(cid == NULL){
		if(!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "client id must be a str or None");
		return NULL;
	}
	record *r = lookup(cid);
	if(r){
		set_clear(&r->pub);
		set_clear(&r->read);
	}
	Py_RETURN_NONE;
}

static PyObject *fast_take_counts(PyObject *self, PyObject *unused)
{
	(void)self; (void)unused;
	PyObject *out = PyList_New(0);
	for(size_t i = 0; out && i < g_buckets; i++){
		for(record *r = g_table[i]; r; r = r->next){
			if(r->routed == 0) continue;
			PyObject *item = Py_BuildValue("(sK)", r->client_id, (unsigned long long)r->routed);
			if(item == NULL || PyList_Append(out, item)){
				Py_XDECREF(item);
				Py_CLEAR(out);
				break;
			}
			Py_DECREF(item);
			r->routed = 0;
		}
	}
	return out;
}

static PyObject *fast_set_timing(PyObject *self, PyObject *arg)
{
	(void)self;
	free(g_bounds);
	free(g_hist);
	g_bounds = NULL;
	g_hist = NULL;
	g_nbounds = 0;
	g_hist_sum = 0;
	g_hist_count = 0;
	if(arg == Py_None) Py_RETURN_NONE;
	PyObject *seq = PySequence_Fast(arg, "buckets must be a sequence of floats or None");
	if(seq == NULL) return NULL;
	Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
	g_bounds = calloc((size_t)n + 1, sizeof(double));
	g_hist = calloc((size_t)n + 1, sizeof(uint64_t));
	if(!g_bounds || !g_hist){
		Py_DECREF(seq);
		return PyErr_NoMemory();
	}
	for(Py_ssize_t i = 0; i < n; i++){
		g_bounds[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
		if(PyErr_Occurred()){
			Py_DECREF(seq);
			free(g_hist);
			g_hist = NULL;
			return NULL;
		}
	}
	g_nbounds = (int)n;
	Py_DECREF(seq);
	Py_RETURN_NONE;
}

/* take_timing() -> (counts per bucket, the last one beyond every bound; sum; count) */
static PyObject *fast_take_timing(PyObject *self, PyObject *unused)
{
	(void)self; (void)unused;
	if(g_hist == NULL) Py_RETURN_NONE;
	PyObject *counts = PyList_New(g_nbounds + 1);
	for(int i = 0; counts && i <= g_nbounds; i++){
		PyList_SET_ITEM(counts, i, PyLong_FromUnsignedLongLong(g_hist[i]));
		g_hist[i] = 0;
	}
	PyObject *res = counts ? Py_BuildValue("(NdK)", counts, g_hist_sum, (unsigned long long)g_hist_count) : NULL;
	g_hist_sum = 0;
	g_hist_count = 0;
	return res;
}

/* message(client_id, topic, payload, now) -> (outcome, stripped payload | reason, detail):
 * what the shim does per PUBLISH, for tests and for hosts running outside a broker. */
static PyObject *fast_message(PyObject *self, PyObject *args)
{
	const char *cid, *topic;
	Py_buffer payload;
	double now;
	fl_result res = {0};
	(void)self;
	if(!PyArg_ParseTuple(args, "ssy*d:message", &cid, &topic, &payload, &now)) return NULL;
	if(payload.len > UINT32_MAX){
		PyBuffer_Release(&payload);
		PyErr_SetString(PyExc_ValueError, "payload too long");
		return NULL;
	}
	int rc = fl_message(cid, topic, payload.buf, (uint32_t)payload.len, now, &res);
	PyObject *out;
	if(rc == FL_ROUTE && g_seal.on){  /* what the broker routes: the body, sealed */
		out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)res.body_len + HEADER);
		if(out != NULL){
			uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
			memcpy(o, payload.buf, res.body_len);
			fl_seal(topic, o, res.body_len, o + res.body_len);
			out = Py_BuildValue("(iNO)", rc, out, Py_None);
		}
	}else if(rc == FL_ROUTE || rc == FL_VERIFIED){
		out = Py_BuildValue("(iy#O)", rc, (const char *)payload.buf, (Py_ssize_t)res.body_len, Py_None);
	}else if(rc == FL_REJECT){
		out = Py_BuildValue("(iss)", rc, res.reason, res.detail);
	}else{
		out = Py_BuildValue("(iOO)", rc, Py_None, Py_None);
	}
	PyBuffer_Release(&payload);
	return out;
}

/* verify_parts(key, header, action, body, now) -> (VERIFIED, epoch, seq) |
 * (REJECT, reason, detail) | (PASS, None, None): one message of the session opened under
 * `key`, in the pieces structauth.session.Session.verify takes (the accelerator behind it,
 * structauth.accel). PASS: not judged here (wrong length, another session or mode, an
 * action too long for the wire): the caller's Python path gives the precise refusal. */
static PyObject *fast_verify_parts(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	(void)self;
	if(nargs != 5 || !PyUnicode_Check(args[0]) || !PyBytes_Check(args[1])
			|| !PyBytes_Check(args[2]) || !PyBytes_Check(args[3])){
		PyErr_SetString(PyExc_TypeError, "verify_parts(key: str, header: bytes, action: bytes, "
				"body: bytes, now: float)");
		return NULL;
	}
	double now = PyFloat_AsDouble(args[4]);
	if(now == -1.0 && PyErr_Occurred()) return NULL;
	const char *key = PyUnicode_AsUTF8(args[0]);
	if(key == NULL) return NULL;
	Py_ssize_t hlen = PyBytes_GET_SIZE(args[1]), alen = PyBytes_GET_SIZE(args[2]);
	Py_ssize_t blen = PyBytes_GET_SIZE(args[3]);
	record *r = lookup(key);
	if(r == NULL || !r->session || hlen != HEADER || alen > 0xFFFF || blen > UINT32_MAX){
		return Py_BuildValue("(iOO)", FL_PASS, Py_None, Py_None);
	}
	fl_result res = {0};
	int rc = verify(r, PyBytes_AS_STRING(args[2]), (size_t)alen,
			(const uint8_t *)PyBytes_AS_STRING(args[1]),
			(const uint8_t *)PyBytes_AS_STRING(args[3]), (uint32_t)blen, now, &res);
	if(rc == FL_VERIFIED) return Py_BuildValue("(iiL)", rc, res.epoch, (long long)res.seq);
	if(rc == FL_REJECT) return Py_BuildValue("(iss)", rc, res.reason, res.detail);
	return Py_BuildValue("(iOO)", FL_PASS, Py_None, Py_None);
}

/* erase(key, now): drop receive keys older than the acceptance window at `now` (the
 * session's timer calls this, so keys age even when no message arrives). */
static PyObject *fast_erase(PyObject *self, PyObject *args)
{
	const char *key;
	double now;
	(void)self;
	if(!PyArg_ParseTuple(args, "sd:erase", &key, &now)) return NULL;
	record *r = lookup(key);
	if(r && r->session){
		int current = now > r->start ? (int)((now - r->start) / r->period) : 0;
		if(current - r->w > r->floor) erase_below(r, current - r->w);
	}
	Py_RETURN_NONE;
}

/* seal_interval(prefix, key, valid_from, valid_until): seal routed messages from now on,
 * with this interval's trailer prefix (15 bytes) and MAC key (32 bytes), for messages
 * verified at monotonic times in [valid_from, valid_until).  seal_interval(None): stop. */
static PyObject *fast_seal_interval(PyObject *self, PyObject *args)
{
	Py_buffer prefix = {0}, key = {0};
	double from = 0, until = 0;
	(void)self;
	if(PyTuple_GET_SIZE(args) == 1 && PyTuple_GET_ITEM(args, 0) == Py_None){
		wipe(&g_seal, sizeof g_seal);
		Py_RETURN_NONE;
	}
	if(!PyArg_ParseTuple(args, "y*y*dd:seal_interval", &prefix, &key, &from, &until)) return NULL;
	PyObject *res = NULL;
	if(prefix.len != PREFIX || key.len != 32 || !(from < until)){
		PyErr_SetString(PyExc_ValueError, "seal_interval: 15-byte prefix, 32-byte key, from < until");
	}else{
		b2s_state mac;
		b2s_init(&mac, TAG, key.buf, 32);
		b2s_absorb_pending(&mac);  /* the prefix always follows */
		wipe(&g_seal, sizeof g_seal);
		g_seal.mac = mac;
		wipe(&mac, sizeof mac);
		memcpy(g_seal.prefix, prefix.buf, PREFIX);
		g_seal.from = from;
		g_seal.until = until;
		g_seal.on = g_seal.valid = true;
		res = Py_NewRef(Py_None);
	}
	PyBuffer_Release(&prefix);
	PyBuffer_Release(&key);
	return res;
}

static PyObject *fast_cache_topic(PyObject *self, PyObject *args)
{
	const char *cid, *topic;
	int read = 0;
	(void)self;
	if(!PyArg_ParseTuple(args, "ss|p:cache_topic", &cid, &topic, &read)) return NULL;
	if(read) fl_cache_read(cid, topic);
	else fl_cache_topic(cid, topic);
	Py_RETURN_NONE;
}

static PyObject *fast_stats(PyObject *self, PyObject *unused)
{
	(void)self; (void)unused;
	return Py_BuildValue("{sn}", "records", (Py_ssize_t)g_count);
}

static PyObject *fast_blake2s(PyObject *self, PyObject *args)
{
	Py_buffer key, data;
	int outlen;
	uint8_t out[32];
	(void)self;
	if(!PyArg_ParseTuple(args, "y*y*i:blake2s", &key, &data, &outlen)) return NULL;
	PyObject *res = NULL;
	if(key.len > 32 || outlen < 1 || outlen > 32){
		PyErr_SetString(PyExc_ValueError, "key <= 32 bytes, outlen 1..32");
	}else{
		b2s(out, (size_t)outlen, key.buf, (size_t)key.len, data.buf, (size_t)data.len);
		res = PyBytes_FromStringAndSize((const char *)out, outlen);
	}
	PyBuffer_Release(&key);
	PyBuffer_Release(&data);
	return res;
}

static PyMethodDef METHODS[] = {
	{"open", fast_open, METH_VARARGS, "open(client_id, sid, flags, start, period, w, "
		"expires_at, last_epoch, window, top, mask, chain_key, next_epoch, floor, keys): take "
		"over a session's receive direction"},
	{"close", fast_close, METH_O, "close(client_id): drop the record; its receive state or None"},
	{"forget_topics", fast_forget_topics, METH_O, "forget_topics(client_id | None): drop cached "
		"topic decisions"},
	{"take_counts", fast_take_counts, METH_NOARGS, "[(client_id, messages routed)] since last call"},
	{"set_timing", fast_set_timing, METH_O, "set_timing(bucket bounds | None)"},
	{"take_timing", fast_take_timing, METH_NOARGS, "(bucket counts, sum, count) since last call"},
	{"message", fast_message, METH_VARARGS, "message(client_id, topic, payload, now)"},
	{"cache_topic", fast_cache_topic, METH_VARARGS, "cache_topic(client_id, topic, read=False)"},
	{"tick_soon", fast_tick_soon, METH_NOARGS, "have on_tick() called on the next loop pass"},
	{"stats", fast_stats, METH_NOARGS, "counts"},
	{"blake2s", fast_blake2s, METH_VARARGS, "blake2s(key, data, outlen): the C BLAKE2s"},
	{"verify_parts", (PyCFunction)(void (*)(void))fast_verify_parts, METH_FASTCALL,
		"verify_parts(key, header, action, body, now)"},
	{"erase", fast_erase, METH_VARARGS, "erase(key, now): drop keys out of the window"},
	{"seal_interval", fast_seal_interval, METH_VARARGS, "seal_interval(prefix, key, from, "
		"until) | seal_interval(None): seal routed messages under this fan-out interval"},
	{NULL, NULL, 0, NULL},
};

/* The same code is built twice: into the broker plugin as the built-in `tessera_fast`,
 * and (optionally, by setup.py) as structauth._accel, the accelerator behind
 * Session.verify for the CoAP gateway and the agent. */
#ifndef FL_MODULE
#define FL_MODULE tessera_fast
#endif
#define FL_STR2(x) #x
#define FL_STR(x) FL_STR2(x)
#define FL_CAT2(a, b) a##b
#define FL_CAT(a, b) FL_CAT2(a, b)

static struct PyModuleDef MODULE = {
	PyModuleDef_HEAD_INIT, FL_STR(FL_MODULE),
	"The broker's per-message fast lane (see broker_plugin/shim/fastlane.h).", -1, METHODS,
	NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC FL_CAT(PyInit_, FL_MODULE)(void)
{
	PyObject *m = PyModule_Create(&MODULE);
	if(m && (PyModule_AddIntConstant(m, "PASS", FL_PASS) || PyModule_AddIntConstant(m, "ROUTE", FL_ROUTE)
			|| PyModule_AddIntConstant(m, "VERIFIED", FL_VERIFIED)
			|| PyModule_AddIntConstant(m, "REJECT", FL_REJECT))){
		Py_CLEAR(m);
	}
	return m;
}
