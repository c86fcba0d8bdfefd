/* blake2s.c - see blake2s.h.  Constant-time by construction (no secret-dependent
 * branches or indices); only what SA1 needs: sequential, no tree mode or salt. */
#include "blake2s.h"

#include <string.h>

static const uint32_t IV[8] = {
	0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au,
	0x510E527Fu, 0x9B05688Cu, 0x1F83D9ABu, 0x5BE0CD19u,
};

static const uint8_t SIGMA[10][16] = {
	{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
	{14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
	{11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
	{7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
	{9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
	{2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
	{12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
	{13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
	{6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
	{10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
};

static inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static inline uint32_t load32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

#define G(a, b, c, d, x, y) do { \
	a = a + b + (x); d = rotr(d ^ a, 16); c = c + d; b = rotr(b ^ c, 12); \
	a = a + b + (y); d = rotr(d ^ a, 8);  c = c + d; b = rotr(b ^ c, 7); \
} while(0)

static void compress(b2s_state *s, const uint8_t *block, int last)
{
	uint32_t m[16], v[16];
	for(int i = 0; i < 16; i++) m[i] = load32(block + 4 * i);
	for(int i = 0; i < 8; i++){
		v[i] = s->h[i];
		v[i + 8] = IV[i];
	}
	v[12] ^= s->t[0];
	v[13] ^= s->t[1];
	if(last) v[14] = ~v[14];
	for(int r = 0; r < 10; r++){
		const uint8_t *z = SIGMA[r];
		G(v[0], v[4], v[8], v[12], m[z[0]], m[z[1]]);
		G(v[1], v[5], v[9], v[13], m[z[2]], m[z[3]]);
		G(v[2], v[6], v[10], v[14], m[z[4]], m[z[5]]);
		G(v[3], v[7], v[11], v[15], m[z[6]], m[z[7]]);
		G(v[0], v[5], v[10], v[15], m[z[8]], m[z[9]]);
		G(v[1], v[6], v[11], v[12], m[z[10]], m[z[11]]);
		G(v[2], v[7], v[8], v[13], m[z[12]], m[z[13]]);
		G(v[3], v[4], v[9], v[14], m[z[14]], m[z[15]]);
	}
	for(int i = 0; i < 8; i++) s->h[i] ^= v[i] ^ v[i + 8];
}

static void count(b2s_state *s, uint32_t n)
{
	s->t[0] += n;
	if(s->t[0] < n) s->t[1]++;
}

void b2s_init(b2s_state *s, size_t outlen, const uint8_t *key, size_t keylen)
{
	memcpy(s->h, IV, sizeof(IV));
	/* parameter block word 0: digest length, key length, fanout 1, depth 1 */
	s->h[0] ^= 0x01010000u ^ ((uint32_t)keylen << 8) ^ (uint32_t)outlen;
	s->t[0] = s->t[1] = 0;
	s->outlen = outlen;
	memset(s->buf, 0, sizeof(s->buf));
	s->buflen = 0;
	if(keylen > 0){
		memcpy(s->buf, key, keylen);
		s->buflen = 64; /* the key is a whole (zero-padded) first block */
	}
}

void b2s_update(b2s_state *s, const void *in, size_t n)
{
	const uint8_t *p = in;
	while(n > 0){
		if(s->buflen == 64){ /* more input follows: this block is not the last */
			count(s, 64);
			compress(s, s->buf, 0);
			s->buflen = 0;
		}
		size_t take = 64 - s->buflen;
		if(take > n) take = n;
		memcpy(s->buf + s->buflen, p, take);
		s->buflen += take;
		p += take;
		n -= take;
	}
}

void b2s_absorb_pending(b2s_state *s)
{
	if(s->buflen == 64){
		count(s, 64);
		compress(s, s->buf, 0);
		s->buflen = 0;
	}
}

void b2s_final(b2s_state *s, uint8_t *out)
{
	uint8_t full[32];
	count(s, (uint32_t)s->buflen);
	memset(s->buf + s->buflen, 0, 64 - s->buflen);
	compress(s, s->buf, 1);
	for(int i = 0; i < 8; i++){
		full[4 * i] = (uint8_t)s->h[i];
		full[4 * i + 1] = (uint8_t)(s->h[i] >> 8);
		full[4 * i + 2] = (uint8_t)(s->h[i] >> 16);
		full[4 * i + 3] = (uint8_t)(s->h[i] >> 24);
	}
	memcpy(out, full, s->outlen);
}

void b2s(uint8_t *out, size_t outlen, const uint8_t *key, size_t keylen, const void *data, size_t n)
{
	b2s_state s;
	b2s_init(&s, outlen, key, keylen);
	b2s_update(&s, data, n);
	b2s_final(&s, out);
}
