/*
 * blake2s.h - keyed BLAKE2s (RFC 7693) for the fast lane: the SA1 message tag and key
 * ratchet, so the broker verifies a proof without calling into Python.  Written from
 * the RFC; tests/test_fastlane.py checks it against hashlib.blake2s.
 */
#ifndef TESSERA_BLAKE2S_H
#define TESSERA_BLAKE2S_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
	uint32_t h[8];
	uint32_t t[2];      /* bytes compressed so far */
	uint8_t buf[64];    /* pending block (never compressed until more input or final) */
	size_t buflen;
	size_t outlen;
} b2s_state;

/* outlen 1..32, keylen 0..32.  A keyed state is a reusable template: copy it per message. */
void b2s_init(b2s_state *s, size_t outlen, const uint8_t *key, size_t keylen);
void b2s_update(b2s_state *s, const void *in, size_t n);
void b2s_final(b2s_state *s, uint8_t *out);
/* Compress a pending key block now, so a template costs one block less per use.  Only
 * for a state that will get at least one more byte of input before b2s_final. */
void b2s_absorb_pending(b2s_state *s);
/* one call: out = BLAKE2s(data, key=key) with outlen bytes */
void b2s(uint8_t *out, size_t outlen, const uint8_t *key, size_t keylen, const void *data, size_t n);

#endif
