/*
 * tessera_mosquitto.c - the native shim Mosquitto 2.0 loads (plugin API version 5).
 *
 * All the logic lives in a Python "host" module; this file only embeds CPython, turns
 * broker events into host calls, checks what comes back, and fails closed: if the host
 * raises or returns anything unexpected, the traceback goes to the broker log and the
 * client is refused (MOSQ_ERR_AUTH), the access denied (MOSQ_ERR_ACL_DENIED) or the
 * message dropped.  Build: `python -m broker_plugin.build`.  Checked against the source
 * of Mosquitto v2.0.11 (Debian 12) and v2.0.15 .. v2.0.20.
 *
 * mosquitto.conf (global section; per_listener_settings must stay false, because
 * 2.0.x never sends MOSQ_EVT_TICK to per-listener plugins):
 *   plugin /path/to/tessera_mosquitto.so
 *   plugin_opt_python /path/to/.venv/bin/python   required: sys.prefix becomes the venv
 *   plugin_opt_host broker_plugin.host            host module (this is the default)
 *   plugin_opt_auth_method tessera-sa1            MQTT 5 auth method handled (default)
 *   plugin_opt_path /dir1:/dir2                   optional, prepended to sys.path
 *   plugin_opt_<anything> <value>                 all options reach the host
 *
 * Python host contract (every function is required; ints are MOSQ_ERR_* values):
 *   plugin_init(options: dict[str, str]) -> None           raise to refuse to start
 *   plugin_cleanup() -> None
 *   on_reload(options: dict[str, str]) -> None             the options given at init
 *       On SIGHUP Mosquitto 2.0.x also re-checks every connected client: it drops those
 *       without a username (allow_anonymous false) and puts the others through basic
 *       auth.  A connection authenticated by extended auth gets its client id as
 *       username and is not re-asked (on_basic_auth is not called), so it survives.
 *   on_basic_auth(client_id: str, username: str | None, password: bytes | None,
 *                 address: str, protocol: int) -> int      protocol 3, 4, 5 = MQTT 3.1,
 *                                                          3.1.1, 5; 0 / AUTH / DEFER
 *   on_ext_auth_start(client_id, address, protocol, method: str, data: bytes | None,
 *                     *, reauth: bool = False) -> tuple[int, bytes | None]
 *   on_ext_auth_continue(same arguments) -> tuple[int, bytes | None]
 *       rc: 0, MOSQ_ERR_AUTH_CONTINUE (-4), MOSQ_ERR_AUTH (11) or NOT_SUPPORTED (10);
 *       data out at most 65535 bytes.  `reauth=True` is passed ONLY for a
 *       re-authentication inside a live connection (AUTH packet, reason 0x19), so a
 *       host whose functions lack the keyword refuses re-authentication (TypeError,
 *       logged) instead of mistaking it for a fresh CONNECT.
 *   on_acl_check(client_id: str, access: int, topic: str, payload: bytes, qos: int,
 *                retain: bool) -> int                      0 / ACL_DENIED / DEFER
 *       access MOSQ_ACL_READ (per delivery, per subscriber), WRITE, SUBSCRIBE,
 *       UNSUBSCRIBE, and for WRITE these flags (broker_plugin/paths.py):
 *         0x100 RETAIN     the message has the retain flag;
 *         0x200 WILL       not a PUBLISH: Mosquitto is about to publish a Will (no
 *                          on_message follows).  A WRITE is a PUBLISH only when it
 *                          comes from the connection that holds its client id after
 *                          the host accepted it, while the broker runs; any other is a
 *                          Will (an abrupt close or DISCONNECT 0x04 right after
 *                          on_disconnect, a will delay or session end later, a
 *                          takeover, a shutdown) or, with check_retain_source, a
 *                          retained message's publisher (a fake context: refuse it);
 *         0x400 CONFIRMED  with WILL: the connection that set it was accepted by the
 *                          host (on_ext_auth_* or on_basic_auth answered 0);
 *         0x800 DELAYED    with WILL: checked more than 0.5 s after that connection's
 *                          on_disconnect.
 *   on_message(client_id: str, topic: str, payload: bytes, qos: int, retain: bool)
 *       -> tuple[int, bytes | None, int, str | None]
 *       rc (0 = route, anything else = drop), new payload or None (unchanged), MQTT 5
 *       reason code and reason string for a drop (see handle_message for what 2.0.x
 *       actually sends).  Not called for wills: Mosquitto queues them directly.
 *   on_tick() -> list[tuple]   once per event-loop pass (at least every 100 ms when
 *                              idle, more often under load): actions, performed on
 *                              the broker thread:
 *       ("kick", client_id)
 *       ("publish", client_id | None, topic, payload: bytes, qos: int, retain: bool)
 *   on_disconnect(client_id: str, reason: int) -> None
 *       Only for the connection that currently holds client_id: when a new connection
 *       takes a client id over, Mosquitto disconnects the old one AFTER the new one has
 *       authenticated; that stale disconnect is not reported (it would make the host
 *       drop the new session).  Not called for a connection whose CONNECT was refused
 *       (Mosquitto has already forgotten its client id).  reason is -1 in 2.0.x.
 *
 * Optional, the fast lane (fastlane.h; both or neither):
 *   on_verified(client_id, topic, payload, qos, retain)
 *       -> tuple[int, bytes | None, int, str | None, bool]
 *       A PUBLISH whose proof the fast lane verified (payload: proof stripped) on a
 *       topic it has no decision for: on_message's answer plus "repeatable": True lets
 *       the fast lane route this (client, topic) from now on without calling the host.
 *   on_rejected(client_id, topic, reason: str, detail: str)
 *       -> tuple[int, bytes | None, int, str | None]
 *       A PUBLISH the fast lane refused (reason: a structauth Reason name in lower
 *       case): the host records it; the message is dropped whatever rc says.
 *   The host drives the fast lane through the built-in module `tessera_fast` (open /
 *   close a client's record, forget cached decisions, collect counts and timings,
 *   tick_soon).  With a fast-lane host, on_tick is called at most every 5 ms under
 *   load unless tessera_fast.tick_soon() asked for the next pass; WRITE checks of a
 *   PUBLISH (not a Will, not retained, not on a $-topic) from a client with a record
 *   and READ checks the host granted before are answered here.
 *
 * Strings from the broker are UTF-8 decoded with "surrogateescape" (never fails, never
 * aliases a valid string).  The MQTT password reaches plugins NUL-terminated without a
 * length in 2.0.x, so `password` ends at its first NUL byte.
 *
 * Threads: Mosquitto calls every callback on its single event-loop thread.  The GIL
 * is released between callbacks, so the host's own Python threads (I/O, revocation
 * feed) run while the broker waits in epoll; a callback waits for the GIL at most one
 * switch interval (sys.setswitchinterval, 5 ms by default) if such a thread is busy.
 * Only the broker thread may call the broker API, hence the on_tick() action list.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#include "fastlane.h"

#if defined(__has_include)
#  if __has_include(<mosquitto.h>)
#    include <mosquitto.h>
#  endif
#endif
#ifndef LIBMOSQUITTO_VERSION_NUMBER
/* Debian's mosquitto-dev ships only mosquitto_broker.h and mosquitto_plugin.h; these
 * values come from libmosquitto-dev's mosquitto.h and are fixed in the 2.0 ABI. */
#define MOSQ_LOG_INFO (1 << 0)
#define MOSQ_LOG_NOTICE (1 << 1)
#define MOSQ_LOG_WARNING (1 << 2)
#define MOSQ_LOG_ERR (1 << 3)
#define MOSQ_LOG_DEBUG (1 << 4)
enum {
	MOSQ_ERR_AUTH_CONTINUE = -4,
	MOSQ_ERR_SUCCESS = 0,
	MOSQ_ERR_NOMEM = 1,
	MOSQ_ERR_INVAL = 3,
	MOSQ_ERR_NOT_FOUND = 6,
	MOSQ_ERR_NOT_SUPPORTED = 10,
	MOSQ_ERR_AUTH = 11,
	MOSQ_ERR_ACL_DENIED = 12,
	MOSQ_ERR_UNKNOWN = 13,
	MOSQ_ERR_PLUGIN_DEFER = 17,
};
#endif

#define MQTT_RC_NOT_AUTHORIZED 0x87

enum { F_INIT, F_CLEANUP, F_RELOAD, F_BASIC_AUTH, F_EXT_START, F_EXT_CONTINUE,
       F_ACL, F_MESSAGE, F_TICK, F_DISCONNECT, F_VERIFIED, F_REJECTED, F_COUNT };
/* the fast-lane functions are optional: a host without them never opens a record */
#define F_REQUIRED F_VERIFIED
static const char *const FN_NAMES[F_COUNT] = {
	"plugin_init", "plugin_cleanup", "on_reload", "on_basic_auth", "on_ext_auth_start",
	"on_ext_auth_continue", "on_acl_check", "on_message", "on_tick", "on_disconnect",
	"on_verified", "on_rejected",
};

static mosquitto_plugin_id_t *g_pid;
static char *g_auth_method;       /* the MQTT 5 authentication method we answer */
static bool g_registered;         /* the host is up and our callbacks are registered */
static bool g_fast;               /* the host has on_verified and on_rejected */
static PyObject *g_fn[F_COUNT];   /* host callables */
static PyObject *g_options;       /* dict given to plugin_init; reused by on_reload */
static PyObject *g_format;        /* exc -> (one-line summary, [traceback lines]) */
static PyObject *g_reauth_kw;     /* {"reauth": True} */
/* Connections we authenticated or are authenticating: int(struct mosquitto *) ->
 * (client_id, authenticated, by extended auth).  Tells a re-authentication from a
 * CONNECT (2.0.x passes no reauth flag to v5 plugins), an AUTH CONTINUE of ours from
 * another plugin's, and a SIGHUP re-check of a connection we authenticated. */
static PyObject *g_conns;
/* client_id -> int(struct mosquitto *) of the connection currently authenticated
 * under that id, to spot the stale disconnect of a connection taken over. */
static PyObject *g_holder;

/* Python helper that formats an exception for the broker log: a one-line summary with
 * where it was raised, and the traceback lines (undecodable bytes escaped). */
static const char FORMAT_SRC[] =
	"import traceback\n"
	"def _safe(s):\n"
	"    return s.encode('utf-8', 'backslashreplace').decode('utf-8')\n"
	"def format_exception(e):\n"
	"    summary = ''.join(traceback.format_exception_only(type(e), e)).strip()\n"
	"    frames = traceback.extract_tb(e.__traceback__)\n"
	"    if frames:\n"
	"        summary += f' ({frames[-1].filename}:{frames[-1].lineno})'\n"
	"    lines = ''.join(traceback.format_exception(type(e), e, e.__traceback__))\n"
	"    return _safe(summary.replace('\\n', ' | ')), _safe(lines.rstrip()).splitlines()\n";

static PyObject *take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
	return PyErr_GetRaisedException();
#else
	PyObject *type, *value, *tb;
	PyErr_Fetch(&type, &value, &tb);
	if(type == NULL) return NULL;
	PyErr_NormalizeException(&type, &value, &tb);
	if(tb && value) PyException_SetTraceback(value, tb);
	Py_XDECREF(type);
	Py_XDECREF(tb);
	return value;
#endif
}

/* Log the pending Python exception (and clear it): "tessera: <what>: <summary>", then
 * the traceback line by line when `traceback` is set.  Needs the GIL. */
static void log_exception(const char *what, bool traceback)
{
	PyObject *exc = take_exception();
	PyObject *res = (exc && g_format) ? PyObject_CallOneArg(g_format, exc) : NULL;

	if(res && PyTuple_Check(res) && PyTuple_GET_SIZE(res) == 2){
		const char *summary = PyUnicode_AsUTF8(PyTuple_GET_ITEM(res, 0));
		mosquitto_log_printf(MOSQ_LOG_ERR, "tessera: %s: %s", what, summary ? summary : "?");
		PyObject *lines = PyTuple_GET_ITEM(res, 1);
		for(Py_ssize_t i = 0; traceback && PyList_Check(lines) && i < PyList_GET_SIZE(lines); i++){
			const char *line = PyUnicode_AsUTF8(PyList_GET_ITEM(lines, i));
			if(line) mosquitto_log_printf(MOSQ_LOG_ERR, "tessera:   %s", line);
		}
	}else{
		PyObject *text = exc ? PyObject_Str(exc) : NULL;
		const char *s = text ? PyUnicode_AsUTF8(text) : NULL;
		mosquitto_log_printf(MOSQ_LOG_ERR, "tessera: %s: %s", what, s ? s : "(unprintable Python error)");
		Py_XDECREF(text);
	}
	Py_XDECREF(res);
	Py_XDECREF(exc);
	PyErr_Clear(); /* whatever formatting itself raised */
}

/* --- conversions ---------------------------------------------------------------- */

static PyObject *str_or_none(const char *s)
{
	if(s == NULL) Py_RETURN_NONE;
	return PyUnicode_DecodeUTF8(s, (Py_ssize_t)strlen(s), "surrogateescape");
}

static PyObject *str_or_empty(const char *s)
{
	return PyUnicode_DecodeUTF8(s ? s : "", s ? (Py_ssize_t)strlen(s) : 0, "surrogateescape");
}

static PyObject *bytes_of(const void *p, size_t len)
{
	return PyBytes_FromStringAndSize(p ? (const char *)p : "", p ? (Py_ssize_t)len : 0);
}

/* A plain int (not bool) within [lo, hi] -> true and *out; else false. */
static bool int_in(PyObject *o, long lo, long hi, long *out)
{
	if(!PyLong_Check(o) || PyBool_Check(o)) return false;
	long v = PyLong_AsLong(o);
	if(v == -1 && PyErr_Occurred()){
		PyErr_Clear();
		return false;
	}
	*out = v;
	return v >= lo && v <= hi;
}

/* UTF-8 of a str without NUL characters, or NULL (no exception left set). */
static const char *utf8_of(PyObject *o)
{
	Py_ssize_t n;
	const char *s = PyUnicode_Check(o) ? PyUnicode_AsUTF8AndSize(o, &n) : NULL;
	if(s == NULL || (size_t)n != strlen(s)){
		PyErr_Clear();
		return NULL;
	}
	return s;
}

/* Call host function f with a new reference `args` (consumed); a new reference or NULL
 * with the exception set. */
static PyObject *call_host(int f, PyObject *args, PyObject *kwargs)
{
	if(args == NULL) return NULL;
	PyObject *res = PyObject_Call(g_fn[f], args, kwargs);
	Py_DECREF(args);
	return res;
}

/* --- which WRITE checks are PUBLISHes (broker_plugin/paths.py) -------------------
 *
 * Mosquitto asks for WRITE access for a PUBLISH (then calls on_message), for a Will when
 * it sends one (no on_message: context__send_will) and, with check_retain_source, for a
 * retained message's publisher (a fake context).  A WRITE is a PUBLISH only when it
 * comes from the connection that holds its client id after the host accepted it, while
 * the broker runs; that set of connections is kept here in C, so the fast lane's answer
 * needs no Python.  Every other WRITE goes to the host flagged as a Will, with what the
 * shim knows about the connection that set it. */
#define TESSERA_ACL_RETAIN 0x100
#define TESSERA_ACL_WILL 0x200
#define TESSERA_ACL_CONFIRMED 0x400
#define TESSERA_ACL_DELAYED 0x800
/* a Will checked this long after its connection's disconnect event was delayed (Will
 * Delay Interval, whole seconds); one sent at the disconnect is checked within it */
#define WILL_DELAYED_AFTER_S 0.5
/* connections whose end is remembered for their Will (cleared when full: fail closed) */
#define DEPARTED_MAX 65536

/* open addressing over pointers; 0 empty, 1 deleted */
static uintptr_t *g_live;
static size_t g_live_cap, g_live_used;

static size_t live_slot(uintptr_t p, size_t cap)
{
	return (size_t)(((uint64_t)p >> 4) * 0x9E3779B97F4A7C15ULL >> 17) & (cap - 1);
}

static bool live_has(const void *ptr)
{
	uintptr_t p = (uintptr_t)ptr;
	if(g_live == NULL || p <= 1) return false;
	for(size_t i = live_slot(p, g_live_cap);; i = (i + 1) & (g_live_cap - 1)){
		if(g_live[i] == p) return true;
		if(g_live[i] == 0) return false;
	}
}

static void live_del(const void *ptr)
{
	uintptr_t p = (uintptr_t)ptr;
	if(g_live == NULL || p <= 1) return;
	for(size_t i = live_slot(p, g_live_cap);; i = (i + 1) & (g_live_cap - 1)){
		if(g_live[i] == p){
			g_live[i] = 1;
			return;
		}
		if(g_live[i] == 0) return;
	}
}

static bool live_add(const void *ptr)
{
	uintptr_t p = (uintptr_t)ptr;
	if(p <= 1) return false;
	if(live_has(ptr)) return true;
	if(g_live == NULL || 2 * (g_live_used + 1) > g_live_cap){ /* rebuild without tombstones */
		size_t live = 0, cap = 64;
		for(size_t i = 0; i < g_live_cap; i++) live += g_live[i] > 1;
		while(cap < 4 * (live + 1)) cap *= 2;
		uintptr_t *t = calloc(cap, sizeof(*t));
		if(t == NULL) return false;
		for(size_t i = 0; i < g_live_cap; i++){
			if(g_live[i] <= 1) continue;
			size_t j = live_slot(g_live[i], cap);
			while(t[j]) j = (j + 1) & (cap - 1);
			t[j] = g_live[i];
		}
		free(g_live);
		g_live = t;
		g_live_cap = cap;
		g_live_used = live;
	}
	size_t i = live_slot(p, g_live_cap);
	while(g_live[i] > 1) i = (i + 1) & (g_live_cap - 1);
	if(g_live[i] == 0) g_live_used++;
	g_live[i] = p;
	return true;
}

/* Mosquitto's own "keep running" flag (signals.c: SIGINT / SIGTERM set it to 0, then
 * main() sends the Will of every connected client).  Found when the broker exports it
 * (Debian's 2.0.11 build does); without it a Will sent at shutdown from a live
 * connection is judged as that connection's PUBLISH would be (docs/MQTT.md). */
static volatile int *g_run;

static void find_run_flag(void)
{
	void *sym = dlsym(RTLD_DEFAULT, "run");
	Dl_info flag, broker;
	if(sym && dladdr(sym, &flag) && dladdr((void *)mosquitto_client_id, &broker)
			&& flag.dli_fbase == broker.dli_fbase){
		g_run = sym;
	}else{
		mosquitto_log_printf(MOSQ_LOG_WARNING, "tessera: this mosquitto does not export its "
				"run flag: a Will sent at shutdown is judged like a PUBLISH of its connection");
	}
}

static bool broker_running(void)
{
	return g_run == NULL || *g_run != 0;
}

/* Connections that ended while holding their client id (key -> (cid, monotonic time)),
 * for the Will Mosquitto checks right after the disconnect event or after a delay. */
static PyObject *g_departed;

/* Needs the GIL.  The flags above for the Will of this connection. */
static int will_flags(struct mosquitto *client, PyObject *key, PyObject *cid)
{
	int flags = 0;
	PyObject *gone = PyDict_GetItemWithError(g_departed, key); /* borrowed */
	if(gone && PyTuple_GET_SIZE(gone) == 2){
		if(PyObject_RichCompareBool(PyTuple_GET_ITEM(gone, 0), cid, Py_EQ) == 1){
			flags |= TESSERA_ACL_CONFIRMED;
			if(fl_monotonic() - PyFloat_AsDouble(PyTuple_GET_ITEM(gone, 1)) > WILL_DELAYED_AFTER_S){
				flags |= TESSERA_ACL_DELAYED;
			}
		}
		PyDict_DelItem(g_departed, key); /* one Will per connection */
	}else if(gone == NULL && !PyErr_Occurred()){
		/* still connected: taken over by a newer connection, or the broker stops */
		PyObject *prior = PyDict_GetItemWithError(g_conns, key);
		if(prior && PyTuple_GET_SIZE(prior) == 3 && PyTuple_GET_ITEM(prior, 1) == Py_True
				&& PyObject_RichCompareBool(PyTuple_GET_ITEM(prior, 0), cid, Py_EQ) == 1){
			flags |= TESSERA_ACL_CONFIRMED;
		}
	}
	(void)client;
	PyErr_Clear();
	return flags;
}

/* Record the connection as authenticated under its client id. */
static void remember(PyObject *key, PyObject *cid, bool authenticated, bool ext)
{
	PyObject *entry = Py_BuildValue("(OOO)", cid, authenticated ? Py_True : Py_False,
			ext ? Py_True : Py_False);
	if(authenticated){ /* it holds the id now; an older holder's WRITEs are its Will */
		PyObject *older = PyDict_GetItemWithError(g_holder, cid); /* borrowed */
		if(older) live_del(PyLong_AsVoidPtr(older));
		PyErr_Clear();
		if(!live_add(PyLong_AsVoidPtr(key))){
			mosquitto_log_printf(MOSQ_LOG_ERR, "tessera: out of memory: %s's PUBLISHes "
					"are judged as Wills (refused)", PyUnicode_AsUTF8(cid));
			PyErr_Clear();
		}
	}
	if(entry == NULL || PyDict_SetItem(g_conns, key, entry)
			|| (authenticated && PyDict_SetItem(g_holder, cid, key))){
		log_exception("cannot record a connection", false);
	}
	Py_XDECREF(entry);
}

/* The connection that held `cid` ended: keep that for its Will (now or delayed). */
static void depart(PyObject *key, PyObject *cid)
{
	if(PyDict_Size(g_departed) >= DEPARTED_MAX){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "tessera: %d connections ended with no Will "
				"sent yet; forgetting them (their Wills will be refused)", DEPARTED_MAX);
		PyDict_Clear(g_departed);
	}
	PyObject *entry = Py_BuildValue("(Od)", cid, fl_monotonic());
	if(entry == NULL || PyDict_SetItem(g_departed, key, entry)){
		log_exception("cannot record a connection's end (its Will will be refused)", false);
	}
	Py_XDECREF(entry);
}

/* A new connection may reuse a freed context's address: forget that one's end. */
static void forget_departed(PyObject *key)
{
	if(key && PyDict_Contains(g_departed, key) == 1) PyDict_DelItem(g_departed, key);
	PyErr_Clear();
}

/* --- callbacks ------------------------------------------------------------------ */

static int handle_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	int rc = MOSQ_ERR_AUTH;
	long v;
	(void)event; (void)userdata;

	PyGILState_STATE gil = PyGILState_Ensure();
	PyObject *cid = str_or_empty(mosquitto_client_id(ed->client));
	PyObject *key = PyLong_FromVoidPtr(ed->client);
	forget_departed(key);
	PyObject *res = NULL, *prior = key ? PyDict_GetItemWithError(g_conns, key) : NULL;
	PyErr_Clear();
	/* SIGHUP: Mosquitto 2.0.x re-checks every connected client (security_apply_default)
	 * and puts those with a username through basic auth again.  A connection we
	 * authenticated with extended auth has no password to check and stays; its username
	 * is its client id (see handle_ext_auth), so the anonymous check lets it through. */
	if(cid && prior && PyTuple_GET_SIZE(prior) == 3 && PyTuple_GET_ITEM(prior, 1) == Py_True
			&& PyTuple_GET_ITEM(prior, 2) == Py_True
			&& PyObject_RichCompareBool(PyTuple_GET_ITEM(prior, 0), cid, Py_EQ) == 1){
		PyErr_Clear();
		Py_DECREF(cid);
		Py_DECREF(key);
		PyGILState_Release(gil);
		return MOSQ_ERR_SUCCESS;
	}
	PyErr_Clear();
	if(cid && key){
		res = call_host(F_BASIC_AUTH, Py_BuildValue("(ONNNi)", cid,
				str_or_none(ed->username),
				ed->password ? bytes_of(ed->password, strlen(ed->password)) : Py_NewRef(Py_None),
				str_or_empty(mosquitto_client_address(ed->client)),
				mosquitto_client_protocol_version(ed->client)), NULL);
	}
	if(res == NULL){
		log_exception("on_basic_auth raised, client refused", true);
	}else if(int_in(res, MOSQ_ERR_SUCCESS, MOSQ_ERR_PLUGIN_DEFER, &v)
			&& (v == MOSQ_ERR_SUCCESS || v == MOSQ_ERR_AUTH || v == MOSQ_ERR_PLUGIN_DEFER)){
		rc = (int)v;
		if(rc == MOSQ_ERR_SUCCESS) remember(key, cid, true, false);
	}else{
		mosquitto_log_printf(MOSQ_LOG_ERR, "tessera: on_basic_auth returned %s, expected 0, "
				"MOSQ_ERR_AUTH or MOSQ_ERR_PLUGIN_DEFER: client refused", Py_TYPE(res)->tp_name);
	}
	Py_XDECREF(res);
	Py_XDECREF(key);
	Py_XDECREF(cid);
	PyGILState_Release(gil);
	return rc;
}

/* MOSQ_EVT_EXT_AUTH_START and _CONTINUE.  Re-authentication (AUTH reason 0x19 on a live
 * connection) does reach EXT_AUTH_START in 2.0.11 (handle_auth.c calls
 * mosquitto_security_auth_start(context, reauth=true, ...)), but the v5 event carries no
 * reauth flag (only v4 plugins get it), so we tell it from our own table: a START for a
 * connection we already authenticated under the same client id is a re-authentication.
 * Memory: Mosquitto releases data_out with plain free() (handle_connect.c, handle_auth.c;
 * every 2.0.x and develop), so it is allocated with malloc(): mosquitto_malloc() would be
 * counted by the broker's memory accounting and never uncounted (AUTH CONTINUE path,
 * measured).  Beware: 2.0.x's own accounting runs DOWN by the size of the auth data on
 * every CONNECT and CONNACK that carries some (read_binary and property_copy_all use
 * calloc/malloc, the frees are counted), so the unsigned count wraps within a few
 * dozen SA1 connects; harmless unless `memory_limit` is set - then the broker refuses
 * every later allocation and connection (measured on 2.0.11).  Never set memory_limit. */
static int handle_ext_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_extended_auth *ed = event_data;
	bool start = event == MOSQ_EVT_EXT_AUTH_START;
	int rc = MOSQ_ERR_AUTH;
	long v;
	(void)userdata;

	/* 2.0.x ignores the event_data filter of mosquitto_callback_register for auth events
	 * and calls every plugin: defer other methods (Mosquitto answers CONNACK 0x8C when
	 * nobody takes them).  CONTINUE events carry no method in 2.0.x: g_conns tells ours. */
	if(start && (ed->auth_method == NULL || strcmp(ed->auth_method, g_auth_method))){
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	const char *what = start ? "on_ext_auth_start" : "on_ext_auth_continue";

	PyGILState_STATE gil = PyGILState_Ensure();
	PyObject *cid = str_or_empty(mosquitto_client_id(ed->client));
	PyObject *key = PyLong_FromVoidPtr(ed->client);
	PyObject *res = NULL, *prior = NULL, *data = NULL;
	bool authenticated = false;
	char msg[96];

	if(cid == NULL || key == NULL) goto error;
	forget_departed(key);
	prior = PyDict_GetItemWithError(g_conns, key); /* borrowed */
	if(prior == NULL && PyErr_Occurred()) goto error;
	if(prior && PyTuple_GET_ITEM(prior, 1) == Py_True){
		int same = PyObject_RichCompareBool(PyTuple_GET_ITEM(prior, 0), cid, Py_EQ);
		if(same < 0) goto error;
		authenticated = same == 1;
	}
	if(!start && prior == NULL){
		rc = MOSQ_ERR_PLUGIN_DEFER; /* a handshake some other plugin started */
		goto done;
	}
	res = call_host(start ? F_EXT_START : F_EXT_CONTINUE, Py_BuildValue("(ONiNN)", cid,
			str_or_empty(mosquitto_client_address(ed->client)),
			mosquitto_client_protocol_version(ed->client),
			str_or_empty(start ? ed->auth_method : g_auth_method),
			ed->data_in ? bytes_of(ed->data_in, ed->data_in_len) : Py_NewRef(Py_None)),
			authenticated ? g_reauth_kw : NULL);
	if(res == NULL) goto error;

	if(!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 2
			|| !int_in(PyTuple_GET_ITEM(res, 0), MOSQ_ERR_AUTH_CONTINUE, MOSQ_ERR_AUTH, &v)
			|| (v != MOSQ_ERR_SUCCESS && v != MOSQ_ERR_AUTH_CONTINUE
				&& v != MOSQ_ERR_AUTH && v != MOSQ_ERR_NOT_SUPPORTED)
			|| ((data = PyTuple_GET_ITEM(res, 1)) != Py_None
				&& (!PyBytes_Check(data) || PyBytes_GET_SIZE(data) > UINT16_MAX))){
		mosquitto_log_printf(MOSQ_LOG_ERR, "tessera: %s returned a %s, expected (0 | "
				"MOSQ_ERR_AUTH_CONTINUE | MOSQ_ERR_AUTH | MOSQ_ERR_NOT_SUPPORTED, bytes "
				"(<= 65535) | None): client refused", what, Py_TYPE(res)->tp_name);
		goto done;
	}
	if((v == MOSQ_ERR_SUCCESS || v == MOSQ_ERR_AUTH_CONTINUE)
			&& data != Py_None && PyBytes_GET_SIZE(data) > 0){
		ed->data_out = malloc((size_t)PyBytes_GET_SIZE(data));
		if(ed->data_out == NULL){
			mosquitto_log_printf(MOSQ_LOG_ERR, "tessera: out of memory: client refused");
			goto done;
		}
		memcpy(ed->data_out, PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data));
		ed->data_out_len = (uint16_t)PyBytes_GET_SIZE(data);
	}
	rc = (int)v;
	if(rc == MOSQ_ERR_SUCCESS){
		remember(key, cid, true, true);
		/* Mosquitto 2.0.x drops every connected client without a username on SIGHUP
		 * when allow_anonymous is false (security_apply_default): name it by its id. */
		int urc = mosquitto_set_username(ed->client, mosquitto_client_id(ed->client));
		if(urc != MOSQ_ERR_SUCCESS){
			mosquitto_log_printf(MOSQ_LOG_WARNING, "tessera: cannot set the username of %s "
					"(error %d): a SIGHUP will disconnect it", mosquitto_client_id(ed->client), urc);
		}
	}
	if(rc == MOSQ_ERR_AUTH_CONTINUE) remember(key, cid, authenticated, true);
	goto done;
error:
	snprintf(msg, sizeof(msg), "%s raised, client refused", what);
	log_exception(msg, true);
done:
	Py_XDECREF(res);
	Py_XDECREF(key);
	Py_XDECREF(cid);
	PyGILState_Release(gil);
	return rc;
}

static int handle_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	int rc = MOSQ_ERR_ACL_DENIED, access = ed->access;
	bool publish = false;
	long v;
	(void)event; (void)userdata;

	/* WRITE: a PUBLISH only from the live connection holding its id (on_message
	 * follows); anything else is a Will (see "which WRITE checks are PUBLISHes").
	 * Fast lane: a PUBLISH of a client with a record, not retained and not on a
	 * $-topic, is "yes" (the publish itself is judged with its proof in on_message); a
	 * READ the host granted before for this (client, topic) stands until the host
	 * forgets it (policy reload, disconnect). */
	const char *cid = mosquitto_client_id(ed->client);
	if(access == MOSQ_ACL_WRITE){
		publish = live_has(ed->client) && broker_running();
		if(g_fast && cid && publish && !ed->retain && ed->topic && ed->topic[0] != '$'
				&& fl_known(cid)){
			return MOSQ_ERR_SUCCESS;
		}
		if(ed->retain) access |= TESSERA_ACL_RETAIN;
	}else if(g_fast && cid && access == MOSQ_ACL_READ && fl_read_cached(cid, ed->topic)){
		return MOSQ_ERR_SUCCESS;
	}

	PyGILState_STATE gil = PyGILState_Ensure();
	PyObject *cid_obj = str_or_empty(cid);
	PyObject *key = PyLong_FromVoidPtr(ed->client);
	PyObject *res = NULL;
	if(cid_obj && key){
		if(ed->access == MOSQ_ACL_WRITE && !publish){
			access |= TESSERA_ACL_WILL | will_flags(ed->client, key, cid_obj);
		}
		res = call_host(F_ACL, Py_BuildValue("(OiNNiO)", cid_obj, access,
				str_or_empty(ed->topic), bytes_of(ed->payload, ed->payloadlen),
				(int)ed->qos, ed->retain ? Py_True : Py_False), NULL);
	}
	if(res == NULL){
		log_exception("on_acl_check raised, access denied", true);
	}else if(int_in(res, MOSQ_ERR_SUCCESS, MOSQ_ERR_PLUGIN_DEFER, &v)
			&& (v == MOSQ_ERR_SUCCESS || v == MOSQ_ERR_ACL_DENIED || v == MOSQ_ERR_PLUGIN_DEFER)){
		rc = (int)v;
		if(g_fast && cid && rc == MOSQ_ERR_SUCCESS && ed->access == MOSQ_ACL_READ){
			fl_cache_read(cid, ed->topic);
		}
	}else{
		mosquitto_log_printf(MOSQ_LOG_ERR, "tessera: on_acl_check returned %s, expected 0, "
				"MOSQ_ERR_ACL_DENIED or MOSQ_ERR_PLUGIN_DEFER: access denied", Py_TYPE(res)->tp_name);
	}
	Py_XDECREF(res);
	Py_XDECREF(key);
	Py_XDECREF(cid_obj);
	PyGILState_Release(gil);
	return rc;
}

/* MOSQ_EVT_MESSAGE, once per incoming PUBLISH (not for wills, not for $CONTROL/).
 *
 * Payload replacement, the same contract in 2.0.11 and 2.0.15 .. 2.0.20 (plugin.c,
 * plugin__handle_message): when event payload != stored payload after the callback,
 * Mosquitto releases the old payload itself with mosquitto__free and adopts ours, which
 * it later releases with mosquitto__free too.  So the new payload is allocated with
 * mosquitto_malloc (so memory accounting stays balanced), the old one is never freed
 * here, and, like Mosquitto's own, it gets a trailing NUL it does not count.  There is
 * no runtime version API in 2.0.x (no mosquitto_broker_version) and nothing to switch
 * on.  The one difference: 2.0.11 adopts the payload after the whole callback loop,
 * 2.0.15+ after each callback even on error, develop only on success - so the payload
 * is replaced only when the message is routed (rc 0), which is correct for all.
 *
 * Dropping: every 2.0.x (and develop) ignores event reason_code / reason_string for
 * this event; MOSQ_ERR_ACL_DENIED is the only return that drops without disconnecting
 * the publisher, and Mosquitto answers it with PUBACK / PUBREC 0x87 (Not authorized)
 * to QoS 1 / 2 publishers.  So every drop returns MOSQ_ERR_ACL_DENIED; the host's
 * reason code goes into event reason_code for brokers that may read it, its reason
 * string only to the debug log (nobody owns or frees that pointer in 2.0.x). */
/* Apply a host answer (rc, payload | None, reason code, reason[, repeatable]) to the
 * event; the return value for Mosquitto.  `what` names the host function for the log.
 * *repeatable is set when the answer routes and the host says the fast lane may repeat
 * it. */
static int apply_answer(struct mosquitto_evt_message *ed, PyObject *res, const char *what,
		Py_ssize_t fields, bool *repeatable)
{
	long v, reason;
	PyObject *payload = NULL, *text = NULL, *again = NULL;

	if(!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != fields
			|| !int_in(PyTuple_GET_ITEM(res, 0), INT_MIN, INT_MAX, &v)
			|| ((payload = PyTuple_GET_ITEM(res, 1)) != Py_None
				&& (!PyBytes_Check(payload) || (size_t)PyBytes_GET_SIZE(payload) >= UINT32_MAX))
			|| !int_in(PyTuple_GET_ITEM(res, 2), 0, 255, &reason)
			|| ((text = PyTuple_GET_ITEM(res, 3)) != Py_None && !PyUnicode_Check(text))
			|| (fields == 5 && !PyBool_Check(again = PyTuple_GET_ITEM(res, 4)))){
		mosquitto_log_printf(MOSQ_LOG_ERR, "tessera: %s returned a %s, expected (int, bytes | "
				"None, int 0-255, str | None%s): message dropped", what, Py_TYPE(res)->tp_name,
				fields == 5 ? ", bool" : "");
		return MOSQ_ERR_ACL_DENIED;
	}
	if(v != 0){
		ed->reason_code = reason >= 0x80 ? (uint8_t)reason : MQTT_RC_NOT_AUTHORIZED;
		if(text != Py_None){
			const char *s = PyUnicode_AsUTF8(text);
			mosquitto_log_printf(MOSQ_LOG_DEBUG, "tessera: dropped PUBLISH from %s on %s: 0x%02lx %s",
					mosquitto_client_id(ed->client), ed->topic, reason, s ? s : "");
			PyErr_Clear();
		}
		return MOSQ_ERR_ACL_DENIED;
	}
	if(payload != Py_None){
		size_t len = (size_t)PyBytes_GET_SIZE(payload);
		char *copy = mosquitto_malloc(len + 1);
		if(copy == NULL){
			mosquitto_log_printf(MOSQ_LOG_ERR, "tessera: out of memory: message dropped");
			return MOSQ_ERR_ACL_DENIED;
		}
		memcpy(copy, PyBytes_AS_STRING(payload), len);
		copy[len] = '\0';
		ed->payload = copy;
		ed->payloadlen = (uint32_t)len;
	}
	if(repeatable) *repeatable = again == Py_True;
	return MOSQ_ERR_SUCCESS;
}

/* The fast lane's answer for a PUBLISH, or -1 when it is not its to answer. */
static int fast_message(struct mosquitto_evt_message *ed)
{
	const char *cid = mosquitto_client_id(ed->client);
	fl_result fr;
	int rc = MOSQ_ERR_ACL_DENIED;
	int out = fl_message(cid, ed->topic, ed->payload, ed->payloadlen, fl_monotonic(), &fr);

	if(out == FL_PASS) return -1;
	if(out == FL_ROUTE){ /* the common case: no Python at all */
		size_t len = (size_t)fr.body_len + (fl_sealing() ? 31 : 0);  /* + fan-out seal */
		char *copy = mosquitto_malloc(len + 1);
		if(copy == NULL){
			mosquitto_log_printf(MOSQ_LOG_ERR, "tessera: out of memory: message dropped");
			return MOSQ_ERR_ACL_DENIED;
		}
		memcpy(copy, ed->payload, fr.body_len);
		if(fl_sealing()) fl_seal(ed->topic, (const uint8_t *)copy, fr.body_len,
				(uint8_t *)copy + fr.body_len);
		copy[len] = '\0';
		ed->payload = copy;
		ed->payloadlen = (uint32_t)len;
		return MOSQ_ERR_SUCCESS;
	}
	PyGILState_STATE gil = PyGILState_Ensure();
	PyObject *res;
	bool repeatable = false;
	if(out == FL_VERIFIED){
		res = call_host(F_VERIFIED, Py_BuildValue("(NNNiO)", str_or_empty(cid),
				str_or_empty(ed->topic), bytes_of(ed->payload, fr.body_len), (int)ed->qos,
				ed->retain ? Py_True : Py_False), NULL);
		if(res == NULL){
			log_exception("on_verified raised, message dropped", true);
		}else{
			rc = apply_answer(ed, res, "on_verified", 5, &repeatable);
			if(rc == MOSQ_ERR_SUCCESS && repeatable) fl_cache_topic(cid, ed->topic);
		}
	}else{
		res = call_host(F_REJECTED, Py_BuildValue("(NNss)", str_or_empty(cid),
				str_or_empty(ed->topic), fr.reason, fr.detail), NULL);
		if(res == NULL){
			log_exception("on_rejected raised, message dropped", true);
		}else if(apply_answer(ed, res, "on_rejected", 4, NULL) == MOSQ_ERR_SUCCESS){
			/* a host cannot route what the fast lane refused */
			mosquitto_log_printf(MOSQ_LOG_ERR, "tessera: on_rejected answered 'route': dropped");
		}
	}
	Py_XDECREF(res);
	PyGILState_Release(gil);
	return rc;
}

static int handle_message(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_message *ed = event_data;
	int rc = MOSQ_ERR_ACL_DENIED;
	(void)event; (void)userdata;

	if(g_fast && (rc = fast_message(ed)) >= 0) return rc;
	rc = MOSQ_ERR_ACL_DENIED;
	PyGILState_STATE gil = PyGILState_Ensure();
	PyObject *res = call_host(F_MESSAGE, Py_BuildValue("(NNNiO)",
			str_or_empty(mosquitto_client_id(ed->client)), str_or_empty(ed->topic),
			bytes_of(ed->payload, ed->payloadlen), (int)ed->qos,
			ed->retain ? Py_True : Py_False), NULL);
	if(res == NULL){
		log_exception("on_message raised, message dropped", true);
	}else{
		rc = apply_answer(ed, res, "on_message", 4, NULL);
	}
	Py_XDECREF(res);
	PyGILState_Release(gil);
	return rc;
}

/* One on_tick() action; false (and a log line) when malformed or refused. */
static bool tick_action(PyObject *a)
{
	const char *kind = (PyTuple_Check(a) && PyTuple_GET_SIZE(a) > 0) ? utf8_of(PyTuple_GET_ITEM(a, 0)) : NULL;
	long qos;
	int rc;

	if(kind && !strcmp(kind, "kick") && PyTuple_GET_SIZE(a) == 2){
		/* NULL would kick every client: the id must be a non-empty str */
		const char *id = utf8_of(PyTuple_GET_ITEM(a, 1));
		if(id == NULL || id[0] == '\0') return false;
		rc = mosquitto_kick_client_by_clientid(id, false);
		if(rc != MOSQ_ERR_SUCCESS){
			mosquitto_log_printf(MOSQ_LOG_DEBUG, "tessera: kick %s: not connected", id);
		}
		return true;
	}
	if(kind && !strcmp(kind, "publish") && PyTuple_GET_SIZE(a) == 6){
		PyObject *target = PyTuple_GET_ITEM(a, 1), *payload = PyTuple_GET_ITEM(a, 3);
		PyObject *retain = PyTuple_GET_ITEM(a, 5);
		const char *id = target == Py_None ? NULL : utf8_of(target);
		const char *topic = utf8_of(PyTuple_GET_ITEM(a, 2));
		if((target != Py_None && (id == NULL || id[0] == '\0'))
				|| topic == NULL || topic[0] == '\0' || strpbrk(topic, "+#") || strlen(topic) > UINT16_MAX
				|| !PyBytes_Check(payload) || PyBytes_GET_SIZE(payload) > INT_MAX - 1
				|| !int_in(PyTuple_GET_ITEM(a, 4), 0, 2, &qos) || !PyBool_Check(retain)){
			return false;
		}
		/* mosquitto_broker_publish with a mosquitto_malloc'd copy rather than
		 * mosquitto_broker_publish_copy: the _copy variant allocates with calloc but
		 * Mosquitto releases the payload with mosquitto__free, so every call would
		 * lower the broker's memory count (unsigned: it wraps, and with memory_limit
		 * set every later allocation fails).  On error the payload is still ours. */
		int len = (int)PyBytes_GET_SIZE(payload);
		void *copy = len ? mosquitto_malloc((size_t)len) : NULL;
		if(len && copy == NULL) return false;
		if(len) memcpy(copy, PyBytes_AS_STRING(payload), (size_t)len);
		rc = mosquitto_broker_publish(id, topic, len, copy, (int)qos, retain == Py_True, NULL);
		if(rc != MOSQ_ERR_SUCCESS){
			mosquitto_free(copy);
			return false;
		}
		return true;
	}
	return false;
}

/* Under load Mosquitto ticks once per event-loop pass, i.e. about once per message; a
 * Python call each time costs more than the fast lane's whole per-message work.  With a
 * fast-lane host, on_tick runs at most every TICK_INTERVAL_S unless the host asked for
 * the next pass (tessera_fast.tick_soon(): kicks or publishes waiting). */
#define TICK_INTERVAL_S 0.005
static double g_next_tick;

static int handle_tick(int event, void *event_data, void *userdata)
{
	(void)event; (void)event_data; (void)userdata;

	if(g_fast){
		double now = fl_monotonic();
		if(!fl_take_tick_soon() && now < g_next_tick) return MOSQ_ERR_SUCCESS;
		g_next_tick = now + TICK_INTERVAL_S;
	}
	PyGILState_STATE gil = PyGILState_Ensure();
	PyObject *res = call_host(F_TICK, PyTuple_New(0), NULL);
	PyObject *seq = NULL;
	if(res == NULL){
		log_exception("on_tick raised", true);
	}else if(res != Py_None){
		seq = (PyList_Check(res) || PyTuple_Check(res)) ? PySequence_Fast(res, "") : NULL;
		if(seq == NULL){
			PyErr_Clear();
			mosquitto_log_printf(MOSQ_LOG_ERR, "tessera: on_tick returned a %s, expected a "
					"list of action tuples", Py_TYPE(res)->tp_name);
		}
		for(Py_ssize_t i = 0; seq && i < PySequence_Fast_GET_SIZE(seq); i++){
			PyObject *a = PySequence_Fast_GET_ITEM(seq, i);
			if(!tick_action(a)){
				PyObject *r = PyObject_Repr(a);
				const char *s = r ? PyUnicode_AsUTF8(r) : NULL;
				mosquitto_log_printf(MOSQ_LOG_ERR, "tessera: on_tick action skipped (malformed "
						"or refused by the broker): %.200s", s ? s : "?");
				Py_XDECREF(r);
				PyErr_Clear();
			}
		}
	}
	Py_XDECREF(seq);
	Py_XDECREF(res);
	PyGILState_Release(gil);
	return MOSQ_ERR_SUCCESS;
}

static int handle_disconnect(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_disconnect *ed = event_data;
	(void)event; (void)userdata;

	live_del(ed->client); /* from now on a WRITE for it is its Will */
	PyGILState_STATE gil = PyGILState_Ensure();
	PyObject *key = PyLong_FromVoidPtr(ed->client);
	PyObject *prior = NULL, *cid = NULL, *holder, *res = NULL;
	const char *id = mosquitto_client_id(ed->client);

	if(key == NULL) goto error;
	forget_departed(key);
	prior = PyDict_GetItemWithError(g_conns, key);
	if(prior == NULL && PyErr_Occurred()) goto error;
	Py_XINCREF(prior);
	if(prior && PyDict_DelItem(g_conns, key)) goto error;
	if(id){
		cid = str_or_empty(id);
	}else if(prior){
		cid = Py_NewRef(PyTuple_GET_ITEM(prior, 0));
	}
	if(cid == NULL) goto done; /* refused at CONNECT: Mosquitto forgot the id */

	holder = PyDict_GetItemWithError(g_holder, cid);
	if(holder == NULL && PyErr_Occurred()) goto error;
	if(holder){
		int same = PyObject_RichCompareBool(holder, key, Py_EQ);
		if(same < 0) goto error;
		if(!same) goto done; /* taken over: the id belongs to a newer connection */
		if(PyDict_DelItem(g_holder, cid)) goto error;
		if(prior && PyTuple_GET_ITEM(prior, 1) == Py_True) depart(key, cid);
	}
	res = call_host(F_DISCONNECT, Py_BuildValue("(Oi)", cid, ed->reason), NULL);
	if(res == NULL) goto error;
	goto done;
error:
	log_exception("on_disconnect raised", true);
done:
	Py_XDECREF(res);
	Py_XDECREF(cid);
	Py_XDECREF(prior);
	Py_XDECREF(key);
	PyGILState_Release(gil);
	return MOSQ_ERR_SUCCESS;
}

/* 2.0.x passes no options with MOSQ_EVT_RELOAD (SIGHUP), so the host gets those of
 * plugin_init.  Returning DEFER lets later plugins' reload callbacks run too. */
static int handle_reload(int event, void *event_data, void *userdata)
{
	(void)event; (void)event_data; (void)userdata;

	PyGILState_STATE gil = PyGILState_Ensure();
	PyObject *res = call_host(F_RELOAD, PyTuple_Pack(1, g_options), NULL);
	if(res == NULL) log_exception("on_reload raised", true);
	Py_XDECREF(res);
	PyGILState_Release(gil);
	return MOSQ_ERR_PLUGIN_DEFER;
}

static const struct { int event; MOSQ_FUNC_generic_callback cb; } CALLBACKS[] = {
	{MOSQ_EVT_RELOAD, handle_reload},
	{MOSQ_EVT_ACL_CHECK, handle_acl_check},
	{MOSQ_EVT_BASIC_AUTH, handle_basic_auth},
	{MOSQ_EVT_EXT_AUTH_START, handle_ext_auth},
	{MOSQ_EVT_EXT_AUTH_CONTINUE, handle_ext_auth},
	{MOSQ_EVT_MESSAGE, handle_message},
	{MOSQ_EVT_TICK, handle_tick},
	{MOSQ_EVT_DISCONNECT, handle_disconnect},
};
#define N_CALLBACKS (sizeof(CALLBACKS) / sizeof(CALLBACKS[0]))

/* --- plugin entry points ---------------------------------------------------------- */

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

static const char *option(struct mosquitto_opt *options, int count, const char *key, const char *dflt)
{
	for(int i = 0; i < count; i++){
		if(options[i].key && !strcmp(options[i].key, key)) return options[i].value;
	}
	return dflt;
}

/* Start CPython with the venv's python as its executable, so that getpath finds the
 * venv's pyvenv.cfg: sys.prefix is the venv and site adds its site-packages (with the
 * editable install's .pth).  Isolated: PYTHON* variables of the broker's environment
 * are ignored, no user site, no cwd on sys.path, no Python signal handlers (Mosquitto's
 * SIGINT / SIGTERM / SIGHUP handling must stay Mosquitto's). */
static bool start_python(const char *python)
{
	PyConfig config;
	PyStatus status;
	char *argv[] = {(char *)"mosquitto-tessera"};

	/* the fast lane's Python side, importable by the host as `tessera_fast` */
	if(PyImport_AppendInittab("tessera_fast", PyInit_tessera_fast) != 0){
		mosquitto_log_printf(MOSQ_LOG_ERR, "tessera: cannot register the tessera_fast module");
		return false;
	}
	PyConfig_InitIsolatedConfig(&config);
	config.install_signal_handlers = 0;
	status = PyConfig_SetBytesString(&config, &config.program_name, python);
	if(!PyStatus_Exception(status)) status = PyConfig_SetBytesString(&config, &config.executable, python);
	if(!PyStatus_Exception(status)) status = PyConfig_SetBytesArgv(&config, 1, argv);
	if(!PyStatus_Exception(status)) status = Py_InitializeFromConfig(&config);
	PyConfig_Clear(&config);
	if(PyStatus_Exception(status)){
		mosquitto_log_printf(MOSQ_LOG_ERR, "tessera: cannot start Python for %s: %s%s%s", python,
				status.func ? status.func : "", status.func ? ": " : "",
				status.err_msg ? status.err_msg : "unknown error");
		return false;
	}
	return true;
}

/* With the GIL held: options dict, sys.path, host import, plugin_init(options). */
static bool start_host(struct mosquitto_opt *options, int count, const char *module, const char *path)
{
	PyObject *ns = NULL, *mod = NULL, *res = NULL;
	char what[256];
	bool ok = false;

	snprintf(what, sizeof(what), "cannot start the host module %s", module);
	ns = PyDict_New();
	if(ns == NULL || PyDict_SetItemString(ns, "__builtins__", PyEval_GetBuiltins())) goto error;
	res = PyRun_String(FORMAT_SRC, Py_file_input, ns, ns);
	if(res == NULL) goto error;
	Py_CLEAR(res);
	g_format = Py_XNewRef(PyDict_GetItemString(ns, "format_exception"));

	g_options = PyDict_New();
	g_conns = PyDict_New();
	g_holder = PyDict_New();
	g_departed = PyDict_New();
	g_reauth_kw = Py_BuildValue("{sO}", "reauth", Py_True);
	if(!g_options || !g_conns || !g_holder || !g_departed || !g_reauth_kw) goto error;
	for(int i = 0; i < count; i++){
		PyObject *v = str_or_empty(options[i].value);
		int err = v == NULL || PyDict_SetItemString(g_options, options[i].key, v);
		Py_XDECREF(v);
		if(err) goto error;
	}

	if(path && path[0]){ /* "a:b:c" -> sys.path = [a, b, c, ...] */
		PyObject *sys_path = PySys_GetObject("path"); /* borrowed */
		PyObject *p = PyUnicode_DecodeFSDefault(path);
		PyObject *list = p ? PyObject_CallMethod(p, "split", "s", ":") : NULL;
		int err = list == NULL || sys_path == NULL || PyList_SetSlice(sys_path, 0, 0, list);
		Py_XDECREF(list);
		Py_XDECREF(p);
		if(err) goto error;
	}

	mod = PyImport_ImportModule(module);
	if(mod == NULL) goto error;
	for(int f = 0; f < F_COUNT; f++){
		g_fn[f] = PyObject_GetAttrString(mod, FN_NAMES[f]);
		if(f >= F_REQUIRED && (g_fn[f] == NULL || !PyCallable_Check(g_fn[f]))){
			PyErr_Clear();
			Py_CLEAR(g_fn[f]);
			continue;
		}
		if(g_fn[f] == NULL || !PyCallable_Check(g_fn[f])){
			PyErr_Clear();
			mosquitto_log_printf(MOSQ_LOG_ERR, "tessera: host module %s has no function %s() "
					"(see the contract in tessera_mosquitto.c)", module, FN_NAMES[f]);
			goto out;
		}
	}
	g_fast = g_fn[F_VERIFIED] && g_fn[F_REJECTED];
	snprintf(what, sizeof(what), "%s.plugin_init refused to start", module);
	res = call_host(F_INIT, PyTuple_Pack(1, g_options), NULL);
	if(res == NULL) goto error;
	ok = true;
	goto out;
error:
	log_exception(what, false);
out:
	Py_XDECREF(res);
	Py_XDECREF(mod);
	Py_XDECREF(ns);
	return ok;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *options, int option_count)
{
	const char *python = option(options, option_count, "python", NULL);
	const char *module = option(options, option_count, "host", "broker_plugin.host");
	const char *path = option(options, option_count, "path", NULL);
	Dl_info self;
	(void)userdata;

	g_pid = identifier;
	g_auth_method = strdup(option(options, option_count, "auth_method", "tessera-sa1"));
	if(g_auth_method == NULL) return MOSQ_ERR_NOMEM;
	if(python == NULL || python[0] == '\0'){
		mosquitto_log_printf(MOSQ_LOG_ERR, "tessera: plugin_opt_python is required "
				"(the virtualenv's python, e.g. /opt/tessera/.venv/bin/python)");
		return MOSQ_ERR_INVAL;
	}
	if(access(python, X_OK) != 0){
		mosquitto_log_printf(MOSQ_LOG_ERR, "tessera: plugin_opt_python %s is not an executable "
				"this user can run: %s", python, strerror(errno));
		return MOSQ_ERR_INVAL;
	}
	if(Py_IsInitialized()){
		mosquitto_log_printf(MOSQ_LOG_ERR, "tessera: Python is already running in this broker "
				"(is the plugin configured twice?)");
		return MOSQ_ERR_INVAL;
	}
	/* Mosquitto dlclose()s plugins after cleanup while the host's Python threads may
	 * still run until exit: keep this library, hence libpython, mapped. */
	if(dladdr((void *)mosquitto_plugin_init, &self) && self.dli_fname){
		dlopen(self.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
	}
	if(!start_python(python)) return MOSQ_ERR_UNKNOWN;

	bool ok = start_host(options, option_count, module, path);
	for(size_t i = 0; ok && i < N_CALLBACKS; i++){
		int rc = mosquitto_callback_register(g_pid, CALLBACKS[i].event, CALLBACKS[i].cb, NULL, NULL);
		if(rc != MOSQ_ERR_SUCCESS){
			mosquitto_log_printf(MOSQ_LOG_ERR, "tessera: cannot register callback for event %d: "
					"error %d", CALLBACKS[i].event, rc);
			ok = false;
		}
	}
	g_registered = ok;
	if(ok){
		/* after the host started: a broker that refuses to start says why in one line,
		 * not after this warning (a Mosquitto built with its own makefiles exports only
		 * the plugin API, not `run`; Debian's build exports it) */
		find_run_flag();
		mosquitto_log_printf(MOSQ_LOG_INFO, "tessera: host %s ready (Python %s, auth method %s)",
				module, Py_GetVersion(), g_auth_method);
	}
	/* Release the GIL so the host's threads run between callbacks; each callback takes
	 * it back with PyGILState_Ensure (this thread keeps its Python thread state). */
	(void)PyEval_SaveThread();
	return ok ? MOSQ_ERR_SUCCESS : MOSQ_ERR_UNKNOWN;
}

/* No Py_FinalizeEx: it would wait for the host's non-daemon threads (a blocked I/O
 * thread would hang broker shutdown forever) and run finalizers while daemon threads
 * still run.  The broker exits right after this; the host flushes and closes what it
 * owns in plugin_cleanup(). */
int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata; (void)options; (void)option_count;

	for(size_t i = 0; g_registered && i < N_CALLBACKS; i++){
		mosquitto_callback_unregister(g_pid, CALLBACKS[i].event, CALLBACKS[i].cb, NULL);
	}
	if(g_registered){
		PyGILState_STATE gil = PyGILState_Ensure();
		PyObject *res = call_host(F_CLEANUP, PyTuple_New(0), NULL);
		if(res == NULL) log_exception("plugin_cleanup raised", true);
		Py_XDECREF(res);
		PyGILState_Release(gil);
	}
	g_registered = false;
	free(g_auth_method);
	g_auth_method = NULL;
	return MOSQ_ERR_SUCCESS;
}
