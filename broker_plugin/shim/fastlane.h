/*
 * fastlane.h - the broker's per-message path in C.
 *
 * Why: four Python calls per routed message (WRITE ACL, on_message, READ ACL per
 * subscriber) cost the broker ~23 us of CPU per message, a quarter of plain
 * Mosquitto's rate.  The fast lane does the common case without Python: for a client
 * whose session the host has handed over (tessera_fast.open), it verifies the SA1 proof
 * (same checks, same order as structauth.session.Session.verify), keeps the replay
 * window and the receive key ratchet, and routes messages on topics the host has
 * already judged plain (no step-up, no direct recipient); it answers WRITE for known
 * clients and READ for (client, topic) pairs the host allowed before.  Everything else
 * -- the first message on a topic, every rejection, other sessions' messages -- still
 * goes to the host, so the Python enforcer stays the one place decisions are made.
 *
 * The state of a session's receive direction lives in exactly one place: the host
 * moves it here (open) and takes it back (close) for a session that must keep
 * verifying in Python (replaced by a re-authentication).  All functions run on the
 * broker thread; the Python-level ones need the GIL, the fl_* ones do not.
 */
#ifndef TESSERA_FASTLANE_H
#define TESSERA_FASTLANE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdbool.h>
#include <stdint.h>

enum fl_outcome {
	FL_PASS,      /* not ours (no record, another session, too short): ask the host */
	FL_ROUTE,     /* proof good, topic judged before: route the stripped payload */
	FL_VERIFIED,  /* proof good, topic new: the host decides (on_verified) */
	FL_REJECT,    /* proof bad: the host records why (on_rejected) and it is dropped */
};

typedef struct {
	const char *reason;     /* Reason name (lower case) for FL_REJECT */
	char detail[160];       /* human-readable, for the audit log */
	uint32_t body_len;      /* payload length without the 31-byte proof */
	int epoch;              /* the verified message's epoch and sequence number */
	int64_t seq;
} fl_result;

PyMODINIT_FUNC PyInit_tessera_fast(void);

/* now: CLOCK_MONOTONIC seconds, the clock of Python's time.monotonic(). */
int fl_message(const char *client_id, const char *topic, const uint8_t *payload,
		uint32_t len, double now, fl_result *r);
void fl_cache_topic(const char *client_id, const char *topic);
bool fl_known(const char *client_id);
bool fl_read_cached(const char *client_id, const char *topic);
void fl_cache_read(const char *client_id, const char *topic);
double fl_monotonic(void);
/* true on a broker that seals fan-out topics: a routed message needs fl_seal's trailer */
bool fl_sealing(void);
/* the 31-byte fan-out trailer of a message fl_message just answered FL_ROUTE for */
void fl_seal(const char *topic, const uint8_t *body, uint32_t len, uint8_t trailer[31]);
/* true once after the host asked for an early tick (tessera_fast.tick_soon()) */
bool fl_take_tick_soon(void);

#endif
