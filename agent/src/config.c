/*-------------------------------------------------------------------------
 *
 * config.c
 *	  Loading and validating the agent's configuration file (libconfig)
 *	  and its secrets file.
 *
 * Every problem is reported as "FILE:LINE: KEY: reason" and refuses the
 * configuration as a whole: the agent never starts on a configuration it
 * only partly understood.  Unknown keys are errors, so typos are caught.
 *
 *-------------------------------------------------------------------------
 */
#include <errno.h>
#include <libgen.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libconfig.h>
#include <openssl/crypto.h>

#include "agent.h"

typedef struct config_ctx
{
	const char *path;
	char	   *errbuf;
	size_t		errsize;
	agent_config *cfg;
} config_ctx;

static const char *const top_keys[] = {
	"listen", "socket_mode", "tls_cert", "tls_key", "secrets_file",
	"state_dir", "limits", "services", NULL
};
static const char *const step_keys[] = {"argv", "cwd", "timeout", "env", NULL};

typedef struct config_limit
{
	const char *name;
	size_t		offset;
	int			def;
	int			min;
	int			max;
} config_limit;

#define LIMIT(n, d, lo, hi) {#n, offsetof(agent_config, n), d, lo, hi}
static const config_limit limit_defs[] = {
	LIMIT(max_body, 16384, 256, 1048576),
	LIMIT(max_jobs, 4, 1, 256),
	LIMIT(max_wait, 30, 0, 3600),
	LIMIT(output_tail, 65536, 0, OUTPUT_TAIL_MAX),
	LIMIT(kill_grace, 5, 1, 600),
	LIMIT(connection_limit, 64, 1, 10000),
	LIMIT(per_ip_connection_limit, 16, 0, 10000),
	LIMIT(connection_timeout, 60, 1, 86400),
	LIMIT(connection_memory_limit, 32768, 8192, 1048576),
	LIMIT(retention_days, 7, 1, 3650),
	LIMIT(retention_max_jobs, 1000, 1, 1000000),
	LIMIT(retention_min_age, 3600, 0, 86400),
	{NULL, 0, 0, 0, 0}
};

/*
 * The file a setting was read from: the configuration file, or one it
 * includes (@include); NULL means the configuration file.
 */
static const char *
config_setting_file(const config_ctx *ctx, const config_setting_t *s)
{
	const char *file = s ? config_setting_source_file(s) : NULL;

	return file ? file : ctx->path;
}

/*
 * Record an error at a line of a file (NULL: the configuration file) as
 * "FILE:LINE: KEY: reason"; a line of 0 reports the file only.  Always
 * returns false so callers can "return config_fail_line(...)".
 */
static bool config_fail_line(config_ctx *ctx, const char *file, int line, const char *key,
							 const char *fmt,...) __attribute__((format(printf, 5, 6)));

static bool
config_fail_line(config_ctx *ctx, const char *file, int line, const char *key, const char *fmt,...)
{
	char		reason[512];
	va_list		ap;

	va_start(ap, fmt);
	vsnprintf(reason, sizeof(reason), fmt, ap);
	va_end(ap);
	if (file == NULL)
		file = ctx->path;
	if (line > 0)
		snprintf(ctx->errbuf, ctx->errsize, "%s:%d: %s: %s", file, line, key, reason);
	else
		snprintf(ctx->errbuf, ctx->errsize, "%s: %s: %s", file, key, reason);
	return false;
}

/*
 * Record an error about a setting as "FILE:LINE: KEY: reason", the file
 * and line being the setting's (a file it was @include'd from is named,
 * as in a syntax error).  A NULL setting reports the file only.  Always
 * returns false so callers can "return config_fail(...)".
 */
static bool config_fail(config_ctx *ctx, const config_setting_t *s, const char *key,
						const char *fmt,...) __attribute__((format(printf, 4, 5)));

static bool
config_fail(config_ctx *ctx, const config_setting_t *s, const char *key,
			const char *fmt,...)
{
	char		reason[512];
	va_list		ap;

	va_start(ap, fmt);
	vsnprintf(reason, sizeof(reason), fmt, ap);
	va_end(ap);
	return config_fail_line(ctx, config_setting_file(ctx, s), s ? (int) config_setting_source_line(s) : 0,
							key, "%s", reason);
}

/*
 * Refuse any member of a group whose name is not in the allowed list.
 */
static bool
config_check_keys(config_ctx *ctx, const config_setting_t *group,
				  const char *where, const char *const *allowed)
{
	for (int i = 0; i < config_setting_length(group); i++)
	{
		config_setting_t *m = config_setting_get_elem(group, i);
		const char *name = config_setting_name(m);
		bool		known = false;

		for (int k = 0; allowed[k] != NULL; k++)
			known |= (name && strcmp(name, allowed[k]) == 0);
		if (!known)
		{
			char		key[256];

			snprintf(key, sizeof(key), "%s%s", where, name ? name : "?");
			return config_fail(ctx, m, key, "unknown key");
		}
	}
	return true;
}

/*
 * Fetch an optional string member; a present member of another type is an
 * error.  *out is left NULL when the member is absent.
 */
static bool
config_get_string(config_ctx *ctx, const config_setting_t *group,
				  const char *name, const char *key, const char **out)
{
	config_setting_t *s = config_setting_get_member(group, name);

	*out = NULL;
	if (s == NULL)
		return true;
	if (config_setting_type(s) != CONFIG_TYPE_STRING)
		return config_fail(ctx, s, key, "must be a string");
	*out = config_setting_get_string(s);
	return true;
}

/*
 * Fetch an optional integer member within min..max, defaulting to def.
 */
static bool
config_get_int(config_ctx *ctx, const config_setting_t *group, const char *name,
			   const char *key, int def, int min, int max, int *out)
{
	config_setting_t *s = config_setting_get_member(group, name);
	long long	v;

	*out = def;
	if (s == NULL)
		return true;
	if (config_setting_type(s) != CONFIG_TYPE_INT &&
		config_setting_type(s) != CONFIG_TYPE_INT64)
		return config_fail(ctx, s, key, "must be an integer");
	v = config_setting_get_int64(s);
	if (v < min || v > max)
		return config_fail(ctx, s, key, "must be between %d and %d", min, max);
	*out = (int) v;
	return true;
}

/*
 * Turn a path from the configuration into an absolute one.  Relative
 * paths are taken relative to $CREDENTIALS_DIRECTORY when systemd set it
 * (LoadCredential=), and to the configuration file's directory otherwise.
 */
static char *
config_resolve_path(const char *cfgpath, const char *value)
{
	const char *creds = getenv("CREDENTIALS_DIRECTORY");
	char	   *copy;
	char	   *res;
	size_t		len;

	if (value[0] == '/')
		return strdup(value);
	if (creds != NULL && creds[0] == '/')
	{
		len = strlen(creds) + strlen(value) + 2;
		res = malloc(len);
		if (res)
			snprintf(res, len, "%s/%s", creds, value);
		return res;
	}
	copy = strdup(cfgpath);
	if (copy == NULL)
		return NULL;
	len = strlen(copy) + strlen(value) + 2;
	res = malloc(len);
	if (res)
		snprintf(res, len, "%s/%s", dirname(copy), value);
	free(copy);
	return res;
}

/*
 * Parse the listen setting: "host:port", "[v6addr]:port", "unix:/path" or
 * an absolute socket path.
 */
static bool
config_parse_listen(config_ctx *ctx, const config_setting_t *s, const char *v)
{
	agent_config *cfg = ctx->cfg;
	const char *colon;
	char	   *end;
	long		port;

	cfg->listen = strdup(v);
	if (strncmp(v, "unix:", 5) == 0 || v[0] == '/')
	{
		const char *p = v[0] == '/' ? v : v + 5;

		if (p[0] != '/' || strlen(p) >= 108)
			return config_fail(ctx, s, "listen", "unix socket path must be absolute and under 108 bytes");
		cfg->listen_unix = strdup(p);
		return true;
	}
	colon = strrchr(v, ':');
	if (colon == NULL || colon == v || colon[1] == '\0')
		return config_fail(ctx, s, "listen", "expected host:port, [ipv6]:port or unix:/path");
	errno = 0;
	port = strtol(colon + 1, &end, 10);
	if (errno != 0 || *end != '\0' || port < 0 || port > 65535)
		return config_fail(ctx, s, "listen", "port must be 0..65535");
	if (v[0] == '[')
	{
		if (colon[-1] != ']' || colon - v < 3)
			return config_fail(ctx, s, "listen", "malformed [ipv6]:port");
		cfg->listen_host = strndup(v + 1, colon - v - 2);
	}
	else
		cfg->listen_host = strndup(v, colon - v);
	cfg->listen_port = (int) port;
	return true;
}

/*
 * Read the limits group, applying the defaults and range checks of
 * limit_defs.
 */
static bool
config_parse_limits(config_ctx *ctx, const config_setting_t *root)
{
	config_setting_t *g = config_setting_get_member(root, "limits");
	const char *names[32];
	int			n = 0;

	for (const config_limit *l = limit_defs; l->name; l++)
	{
		*(int *) ((char *) ctx->cfg + l->offset) = l->def;
		names[n++] = l->name;
	}
	names[n] = NULL;
	if (g == NULL)
		return true;
	if (config_setting_type(g) != CONFIG_TYPE_GROUP)
		return config_fail(ctx, g, "limits", "must be a group { ... }");
	if (!config_check_keys(ctx, g, "limits.", names))
		return false;
	for (const config_limit *l = limit_defs; l->name; l++)
	{
		char		key[64];

		snprintf(key, sizeof(key), "limits.%s", l->name);
		if (!config_get_int(ctx, g, l->name, key, l->def, l->min, l->max,
							(int *) ((char *) ctx->cfg + l->offset)))
			return false;
	}
	if (ctx->cfg->connection_timeout < ctx->cfg->max_wait + 5)
		return config_fail(ctx, g, "limits.connection_timeout",
						   "must be at least limits.max_wait + 5 so that long polls are answered");
	return true;
}

/*
 * Check that an environment variable name is a plain identifier.
 */
static bool
config_env_name_ok(const char *name)
{
	if (name == NULL || name[0] == '\0' || (name[0] >= '0' && name[0] <= '9'))
		return false;
	for (const char *p = name; *p; p++)
		if (!((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') ||
			  (*p >= '0' && *p <= '9') || *p == '_'))
			return false;
	return true;
}

/*
 * Read a step's env group: NAME = "value" pairs added to the step's
 * otherwise minimal environment.
 */
static bool
config_parse_env(config_ctx *ctx, const config_setting_t *g, const char *key,
				 config_step *step)
{
	int			n = config_setting_length(g);

	if (config_setting_type(g) != CONFIG_TYPE_GROUP)
		return config_fail(ctx, g, key, "must be a group { NAME = \"value\"; }");
	if ((step->env = calloc(n + 1, sizeof(config_env))) == NULL)
		return config_fail(ctx, g, key, "out of memory");
	for (int i = 0; i < n; i++)
	{
		config_setting_t *e = config_setting_get_elem(g, i);
		const char *name = config_setting_name(e);

		if (!config_env_name_ok(name))
			return config_fail(ctx, e, key, "invalid variable name \"%s\"", name ? name : "");
		if (config_setting_type(e) != CONFIG_TYPE_STRING)
			return config_fail(ctx, e, key, "value of %s must be a string", name);
		step->env[i].name = strdup(name);
		step->env[i].value = strdup(config_setting_get_string(e));
		step->nenv++;
		if (step->env[i].name == NULL || step->env[i].value == NULL)
			return config_fail(ctx, e, key, "out of memory");
	}
	return true;
}

/*
 * Read a step's argv: a non-empty list or array of strings whose first
 * element is an absolute path (the agent never searches PATH).
 */
static bool
config_parse_argv(config_ctx *ctx, const config_setting_t *a, const char *key,
				  config_step *step)
{
	int			n;
	size_t		bytes = 0;

	if (a == NULL)
		return config_fail(ctx, NULL, key, "missing (each step needs argv = [\"/absolute/program\", ...])");
	if (config_setting_type(a) != CONFIG_TYPE_ARRAY &&
		config_setting_type(a) != CONFIG_TYPE_LIST)
		return config_fail(ctx, a, key, "must be an array of strings");
	n = config_setting_length(a);
	if (n < 1 || n > 256)
		return config_fail(ctx, a, key, "must have 1..256 elements");
	step->argv = calloc(n + 1, sizeof(char *));
	step->argv_json = json_array();
	if (step->argv == NULL || step->argv_json == NULL)
		return config_fail(ctx, a, key, "out of memory");
	for (int i = 0; i < n; i++)
	{
		config_setting_t *e = config_setting_get_elem(a, i);
		json_t	   *js;

		if (config_setting_type(e) != CONFIG_TYPE_STRING)
			return config_fail(ctx, a, key, "element %d must be a string", i);
		if ((step->argv[i] = strdup(config_setting_get_string(e))) == NULL)
			return config_fail(ctx, a, key, "out of memory");
		step->argc++;
		if ((bytes += strlen(step->argv[i]) + 1) > STEP_ARGV_BYTES_MAX)
			return config_fail(ctx, a, key, "must be at most %d bytes in all", STEP_ARGV_BYTES_MAX);

		/*
		 * Every job reports its steps' argv, and errors name the program:
		 * JSON, so UTF-8 (jansson refuses anything else).
		 */
		if ((js = json_string(step->argv[i])) == NULL)
			return config_fail(ctx, a, key, "element %d is not valid UTF-8", i);
		json_array_append_new(step->argv_json, js);
	}
	if (step->argv[0][0] != '/')
		return config_fail(ctx, a, key, "the program \"%s\" must be an absolute path", step->argv[0]);
	if (access(step->argv[0], X_OK) != 0)
		log_msg("warning: %s: %s: \"%s\" is not executable now (%s)",
				ctx->path, key, step->argv[0], strerror(errno));
	return true;
}

/*
 * Read one step group of a service.
 */
static bool
config_parse_step(config_ctx *ctx, const config_setting_t *s, const char *svc,
				  int idx, config_step *step)
{
	char		key[256];
	char		sub[300];
	const char *cwd;
	config_setting_t *env;

	snprintf(key, sizeof(key), "services.%s[%d]", svc, idx);
	if (config_setting_type(s) != CONFIG_TYPE_GROUP)
		return config_fail(ctx, s, key, "each step must be a group { argv = [...]; ... }");
	snprintf(sub, sizeof(sub), "%s.", key);
	if (!config_check_keys(ctx, s, sub, step_keys))
		return false;
	snprintf(sub, sizeof(sub), "%s.argv", key);
	if (!config_parse_argv(ctx, config_setting_get_member(s, "argv"), sub, step))
		return false;
	snprintf(sub, sizeof(sub), "%s.cwd", key);
	if (!config_get_string(ctx, s, "cwd", sub, &cwd))
		return false;
	if (cwd != NULL && cwd[0] != '/')
		return config_fail(ctx, config_setting_get_member(s, "cwd"), sub, "must be an absolute path");
	step->cwd = strdup(cwd ? cwd : "/");
	snprintf(sub, sizeof(sub), "%s.timeout", key);
	if (!config_get_int(ctx, s, "timeout", sub, 300, 1, 86400, &step->timeout))
		return false;
	env = config_setting_get_member(s, "env");
	snprintf(sub, sizeof(sub), "%s.env", key);
	if (env != NULL && !config_parse_env(ctx, env, sub, step))
		return false;
	return true;
}

/* The keys of a service written as a group (see config_service_form()). */
static const char *const service_keys[] = {"name", "steps", NULL};

/*
 * Whether name is a service name the restart_worker registry accepts: 1
 * to 63 ASCII letters, digits, '_', '.' and '-', the first a letter or a
 * digit.
 */
static bool
config_service_name_ok(const char *name)
{
	size_t		len = strlen(name);

	if (len < 1 || len > 63)
		return false;
	for (size_t i = 0; i < len; i++)
	{
		char		c = name[i];
		bool		alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');

		if (!alnum && (i == 0 || (c != '_' && c != '.' && c != '-')))
			return false;
	}
	return true;
}

/*
 * Find the name and the steps of service setting s, written either as
 * label = ( steps ) (the label is the name: libconfig allows a letter
 * first and no '.'), or as label = { name = "..."; steps = ( steps ); }
 * for any name the registry accepts ("api.v2", "1web").  key names s in
 * messages.
 */
static bool
config_service_form(config_ctx *ctx, config_setting_t *s, const char *key,
					const char **name, config_setting_t **steps)
{
	char		sub[160];

	*name = config_setting_name(s);
	*steps = s;
	if (config_setting_type(s) != CONFIG_TYPE_GROUP)
		return true;
	snprintf(sub, sizeof(sub), "%s.", key);
	if (!config_check_keys(ctx, s, sub, service_keys))
		return false;
	snprintf(sub, sizeof(sub), "%s.name", key);
	if (!config_get_string(ctx, s, "name", sub, name))
		return false;
	if (*name == NULL)
		return config_fail(ctx, s, sub, "missing (a service written as a group names itself)");
	*steps = config_setting_get_member(s, "steps");
	if (*steps == NULL)
		return config_fail(ctx, s, key, "must have steps = ( { argv = [...]; }, ... )");
	return true;
}

/*
 * Read the services group: name = ( step, step, ... ), or
 * label = { name = "..."; steps = ( step, ... ); }.
 */
static bool
config_parse_services(config_ctx *ctx, const config_setting_t *root)
{
	config_setting_t *g = config_setting_get_member(root, "services");
	agent_config *cfg = ctx->cfg;
	int			n;

	if (g == NULL)
		return config_fail(ctx, NULL, "services", "missing (at least one service is needed)");
	if (config_setting_type(g) != CONFIG_TYPE_GROUP)
		return config_fail(ctx, g, "services", "must be a group { name = ( steps ); }");
	n = config_setting_length(g);
	if (n < 1)
		return config_fail(ctx, g, "services", "at least one service is needed");
	if ((cfg->services = calloc(n, sizeof(config_service))) == NULL)
		return config_fail(ctx, g, "services", "out of memory");
	for (int i = 0; i < n; i++)
	{
		config_setting_t *s = config_setting_get_elem(g, i);
		config_service *svc = &cfg->services[i];
		const char *label = config_setting_name(s);
		const char *name;
		config_setting_t *steps;
		char		key[128];
		char		where[140];
		int			ns;

		snprintf(key, sizeof(key), "services.%s", label);
		if (!config_service_form(ctx, s, key, &name, &steps))
			return false;

		/*
		 * A name the registry would refuse could never be asked for: a
		 * label with a '*', or of 64 characters, say.
		 */
		snprintf(where, sizeof(where), "%s%s", key, steps == s ? "" : ".name");
		if (!config_service_name_ok(name))
			return config_fail(ctx, s, where,
							   "a service name is 1..63 letters, digits, '_', '.' or '-', the first a letter or digit");
		snprintf(where, sizeof(where), "%s%s", key, steps == s ? "" : ".steps");
		ns = config_setting_length(steps);
		if (config_setting_type(steps) != CONFIG_TYPE_LIST || ns < 1 || ns > STEPS_MAX)
			return config_fail(ctx, steps, where, "must be a list of 1..%d steps ( { argv = [...]; }, ... )", STEPS_MAX);
		svc->name = strdup(name);
		svc->steps = calloc(ns, sizeof(config_step));
		cfg->nservices++;
		if (svc->name == NULL || svc->steps == NULL)
			return config_fail(ctx, s, key, "out of memory");
		for (int k = 0; k < ns; k++)
		{
			svc->nsteps++;
			if (!config_parse_step(ctx, config_setting_get_elem(steps, k), label, k, &svc->steps[k]))
				return false;
		}
	}
	return true;
}

/*
 * Read the optional TLS certificate and key paths; both or neither.
 */
static bool
config_parse_tls(config_ctx *ctx, const config_setting_t *root)
{
	const char *cert;
	const char *key;

	if (!config_get_string(ctx, root, "tls_cert", "tls_cert", &cert) ||
		!config_get_string(ctx, root, "tls_key", "tls_key", &key))
		return false;
	if ((cert == NULL) != (key == NULL))
		return config_fail(ctx, config_setting_get_member(root, cert ? "tls_cert" : "tls_key"),
						   cert ? "tls_key" : "tls_cert",
						   "tls_cert and tls_key must be given together");
	if (cert == NULL)
		return true;
	ctx->cfg->tls_cert = config_resolve_path(ctx->path, cert);
	ctx->cfg->tls_key = config_resolve_path(ctx->path, key);
	if (access(ctx->cfg->tls_cert, R_OK) != 0)
		return config_fail(ctx, config_setting_get_member(root, "tls_cert"), "tls_cert",
						   "cannot read \"%s\": %s", ctx->cfg->tls_cert, strerror(errno));
	if (access(ctx->cfg->tls_key, R_OK) != 0)
		return config_fail(ctx, config_setting_get_member(root, "tls_key"), "tls_key",
						   "cannot read \"%s\": %s", ctx->cfg->tls_key, strerror(errno));
	return true;
}

/*
 * Read the top-level scalar settings: listen, socket_mode, secrets_file,
 * state_dir.
 */
static bool
config_parse_top(config_ctx *ctx, const config_setting_t *root)
{
	const char *v;
	config_setting_t *s;
	char		errbuf[512];

	if (!config_get_string(ctx, root, "listen", "listen", &v))
		return false;
	if (v == NULL)
		return config_fail(ctx, NULL, "listen", "missing (e.g. listen = \"127.0.0.1:8750\";)");
	if (!config_parse_listen(ctx, config_setting_get_member(root, "listen"), v))
		return false;
	if (!config_get_string(ctx, root, "socket_mode", "socket_mode", &v))
		return false;
	ctx->cfg->socket_mode = 0660;
	if (v != NULL)
	{
		char	   *end;
		long		mode = strtol(v, &end, 8);

		if (*end != '\0' || v[0] == '\0' || mode < 0 || mode > 0777)
			return config_fail(ctx, config_setting_get_member(root, "socket_mode"),
							   "socket_mode", "must be an octal mode string such as \"0660\"");
		ctx->cfg->socket_mode = (int) mode;
	}
	if (!config_get_string(ctx, root, "state_dir", "state_dir", &v))
		return false;
	s = config_setting_get_member(root, "state_dir");
	if (v == NULL || v[0] != '/')
		return config_fail(ctx, s, "state_dir", "an absolute directory path is required");
	ctx->cfg->state_dir = strdup(v);
	if (!config_get_string(ctx, root, "secrets_file", "secrets_file", &v))
		return false;
	s = config_setting_get_member(root, "secrets_file");
	if (v == NULL || v[0] == '\0')
		return config_fail(ctx, s, "secrets_file", "missing (a file with one whsec_ secret per line)");
	ctx->cfg->secrets_file = config_resolve_path(ctx->path, v);
	if (!config_load_secrets(ctx->cfg->secrets_file, ctx->cfg->secrets,
							 &ctx->cfg->nsecrets, errbuf, sizeof(errbuf)))
		return config_fail(ctx, s, "secrets_file", "%s", errbuf);
	return config_parse_tls(ctx, root);
}

/*
 * Order two entries of services_by_name by service name, and services of
 * one name in the order of the file (the order of the services array),
 * for qsort.
 */
static int
config_cmp_services(const void *a, const void *b)
{
	const config_service *sa = *(const config_service *const *) a;
	const config_service *sb = *(const config_service *const *) b;
	int			c = strcmp(sa->name, sb->name);

	if (c != 0)
		return c;
	return (sa > sb) - (sa < sb);
}

/*
 * Compare a service name (the key) with an entry of services_by_name, for
 * bsearch.
 */
static int
config_cmp_service_name(const void *key, const void *elem)
{
	const config_service *svc = *(const config_service *const *) elem;

	return strcmp((const char *) key, svc->name);
}

/*
 * Find where service number idx of the services group g names itself: its
 * name setting when written label = { name = "..."; ... }, else the
 * setting itself.  Writes its key (services.LABEL or services.LABEL.name)
 * into key, its file into *file and returns that setting's line.
 */
static int
config_service_name_at(const config_ctx *ctx, const config_setting_t *g, int idx,
					   char *key, size_t keysize, const char **file)
{
	config_setting_t *s = config_setting_get_elem(g, idx);
	config_setting_t *name = config_setting_type(s) == CONFIG_TYPE_GROUP ?
		config_setting_get_member(s, "name") : NULL;

	snprintf(key, keysize, "services.%s%s", config_setting_name(s), name ? ".name" : "");
	*file = config_setting_file(ctx, name ? name : s);
	return (int) config_setting_source_line(name ? name : s);
}

/*
 * Refuse a name configured twice (a and b, a first in the file): the
 * message names the second occurrence's file, line and key, and the
 * first's line and key (and its file, when the two are in different files,
 * one @include'd).
 */
static bool
config_fail_twice(config_ctx *ctx, const config_setting_t *g,
				  const config_service *a, const config_service *b)
{
	char		first[160];
	char		second[160];
	const char *first_file;
	const char *second_file;
	int			first_line = config_service_name_at(ctx, g, (int) (a - ctx->cfg->services),
													first, sizeof(first), &first_file);
	int			second_line = config_service_name_at(ctx, g, (int) (b - ctx->cfg->services),
													 second, sizeof(second), &second_file);

	if (strcmp(first_file, second_file) != 0)
		return config_fail_line(ctx, second_file, second_line, second,
								"service \"%s\" is configured twice (first at %s:%d, %s)",
								b->name, first_file, first_line, first);
	return config_fail_line(ctx, second_file, second_line, second,
							"service \"%s\" is configured twice (first at line %d, %s)",
							b->name, first_line, first);
}

/*
 * Build services_by_name, the services sorted by name, so that every
 * request finds its service in O(log n) however many are configured.
 * libconfig refuses duplicate labels, but a name given with name = "..."
 * may repeat another service's: refused here, as the request would not
 * know which one it meant.
 */
static bool
config_index_services(config_ctx *ctx, const config_setting_t *root)
{
	agent_config *cfg = ctx->cfg;

	cfg->services_by_name = calloc(cfg->nservices, sizeof(config_service *));
	if (cfg->services_by_name == NULL)
		return config_fail(ctx, NULL, "services", "out of memory");
	for (int i = 0; i < cfg->nservices; i++)
		cfg->services_by_name[i] = &cfg->services[i];
	qsort(cfg->services_by_name, cfg->nservices, sizeof(config_service *),
		  config_cmp_services);
	for (int i = 1; i < cfg->nservices; i++)
		if (strcmp(cfg->services_by_name[i - 1]->name, cfg->services_by_name[i]->name) == 0)
			return config_fail_twice(ctx, config_setting_get_member(root, "services"),
									 cfg->services_by_name[i - 1], cfg->services_by_name[i]);
	return true;
}

/*
 * Load and validate the configuration file at path.  Returns NULL with a
 * "FILE:LINE: KEY: reason" message in errbuf if anything is wrong.
 */
agent_config *
config_load(const char *path, char *errbuf, size_t errsize)
{
	config_t	lc;
	config_ctx	ctx = {path, errbuf, errsize, NULL};
	agent_config *cfg = calloc(1, sizeof(agent_config));
	config_setting_t *root;
	bool		ok;

	if (cfg == NULL)
		return NULL;
	cfg->path = strdup(path);
	ctx.cfg = cfg;
	config_init(&lc);
	if (config_read_file(&lc, path) != CONFIG_TRUE)
	{
		if (config_error_type(&lc) == CONFIG_ERR_FILE_IO)
			snprintf(errbuf, errsize, "%s: cannot read file: %s", path, strerror(errno));
		else
			snprintf(errbuf, errsize, "%s:%d: syntax error: %s",
					 config_error_file(&lc) ? config_error_file(&lc) : path,
					 config_error_line(&lc), config_error_text(&lc));
		config_destroy(&lc);
		config_free(cfg);
		return NULL;
	}
	root = config_root_setting(&lc);
	ok = config_check_keys(&ctx, root, "", top_keys) &&
		config_parse_top(&ctx, root) &&
		config_parse_limits(&ctx, root) &&
		config_parse_services(&ctx, root) &&
		config_index_services(&ctx, root);
	config_destroy(&lc);
	if (!ok)
	{
		config_free(cfg);
		return NULL;
	}
	return cfg;
}

/*
 * Strip leading and trailing white space of a line in place.
 */
static char *
config_trim(char *s)
{
	char	   *end;

	while (*s == ' ' || *s == '\t')
		s++;
	end = s + strlen(s);
	while (end > s && (end[-1] == ' ' || end[-1] == '\t' ||
					   end[-1] == '\n' || end[-1] == '\r'))
		*--end = '\0';
	return s;
}

/*
 * Read the secrets file: one whsec_ secret per line, blank lines and
 * lines starting with '#' ignored, at most SECRETS_MAX secrets.  Several
 * secrets are accepted at once so that a new one can be added before the
 * old one is retired.
 */
bool
config_load_secrets(const char *path, verify_secret *secrets, int *nsecrets,
					char *errbuf, size_t errsize)
{
	FILE	   *f = fopen(path, "re");
	char		line[512];
	int			lineno = 0;
	struct stat st;

	*nsecrets = 0;
	if (f == NULL)
	{
		snprintf(errbuf, errsize, "cannot open \"%s\": %s", path, strerror(errno));
		return false;
	}
	if (fstat(fileno(f), &st) == 0 && (st.st_mode & 0007) != 0)
		log_msg("warning: secrets file \"%s\" is readable by other users", path);
	while (fgets(line, sizeof(line), f) != NULL)
	{
		char	   *s = config_trim(line);
		const char *reason;

		lineno++;
		if (s[0] == '\0' || s[0] == '#')
			continue;
		if (*nsecrets >= SECRETS_MAX)
		{
			snprintf(errbuf, errsize, "%s:%d: more than %d secrets", path, lineno, SECRETS_MAX);
			fclose(f);
			return false;
		}
		if (!verify_parse_secret(s, &secrets[*nsecrets], &reason))
		{
			snprintf(errbuf, errsize, "%s:%d: %s", path, lineno, reason);
			fclose(f);
			return false;
		}
		(*nsecrets)++;
	}
	fclose(f);
	if (*nsecrets == 0)
	{
		snprintf(errbuf, errsize, "\"%s\" holds no secret", path);
		return false;
	}
	return true;
}

/*
 * Find a configured service by name; NULL if there is none.  A binary
 * search of services_by_name.
 */
const config_service *
config_find_service(const agent_config *cfg, const char *name)
{
	const config_service *const *found;

	found = bsearch(name, cfg->services_by_name, cfg->nservices,
					sizeof(config_service *), config_cmp_service_name);
	return found ? *found : NULL;
}

/*
 * Free a step's memory.
 */
static void
config_free_step(config_step *step)
{
	for (int i = 0; step->argv && step->argv[i]; i++)
		free(step->argv[i]);
	free(step->argv);
	for (int i = 0; i < step->nenv; i++)
	{
		free(step->env[i].name);
		free(step->env[i].value);
	}
	free(step->env);
	free(step->cwd);
	json_decref(step->argv_json);
}

/*
 * Free a configuration and everything it owns, wiping the secrets.
 */
void
config_free(agent_config *cfg)
{
	if (cfg == NULL)
		return;
	for (int i = 0; i < cfg->nservices; i++)
	{
		for (int k = 0; k < cfg->services[i].nsteps; k++)
			config_free_step(&cfg->services[i].steps[k]);
		free(cfg->services[i].steps);
		free(cfg->services[i].name);
	}
	free(cfg->services);
	free(cfg->services_by_name);
	OPENSSL_cleanse(cfg->secrets, sizeof(cfg->secrets));
	free(cfg->path);
	free(cfg->listen);
	free(cfg->listen_host);
	free(cfg->listen_unix);
	free(cfg->tls_cert);
	free(cfg->tls_key);
	free(cfg->secrets_file);
	free(cfg->state_dir);
	free(cfg);
}
