/*
 * Unit tests of config.c: every refused configuration names the file, the
 * line or key, and the reason.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include "agent.h"

static char dir[] = "/tmp/ra-config-test-XXXXXX";
static char path[512];
static char err[1024];

#define GOOD_SECRET "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
#define BASE "listen = \"127.0.0.1:8750\";\nsecrets_file = \"secrets\";\nstate_dir = \"/tmp/x\";\n"
#define SVC "services = { web = ( { argv = [\"/bin/true\"]; } ); };\n"

/* Write text to name inside the test directory. */
static void
write_file(const char *name, const char *text)
{
	char		p[600];
	FILE	   *f;

	snprintf(p, sizeof(p), "%s/%s", dir, name);
	f = fopen(p, "w");
	assert_non_null(f);
	fputs(text, f);
	fchmod(fileno(f), 0600);
	fclose(f);
}

/* Load text as the configuration; returns the result (and fills err). */
static agent_config *
load(const char *text)
{
	write_file("agent.conf", text);
	err[0] = '\0';
	return config_load(path, err, sizeof(err));
}

/* Assert that text is refused with a message containing each fragment. */
static void
refused(const char *text, const char *frag1, const char *frag2)
{
	agent_config *cfg = load(text);

	if (cfg != NULL)
		fail_msg("configuration accepted:\n%s", text);
	if (strstr(err, frag1) == NULL || (frag2 && strstr(err, frag2) == NULL))
		fail_msg("message \"%s\" lacks \"%s\" / \"%s\"", err, frag1, frag2 ? frag2 : "");
	if (strstr(err, path) != path && strstr(err, dir) == NULL)
		fail_msg("message \"%s\" does not name the file", err);
}

static int
setup(void **state)
{
	(void) state;
	assert_non_null(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/agent.conf", dir);
	write_file("secrets", "# comment\n\n" GOOD_SECRET "\n");
	unsetenv("CREDENTIALS_DIRECTORY");
	return 0;
}

static int
teardown(void **state)
{
	char		p[600];

	(void) state;
	snprintf(p, sizeof(p), "%s/agent.conf", dir);
	unlink(p);
	snprintf(p, sizeof(p), "%s/secrets", dir);
	unlink(p);
	snprintf(p, sizeof(p), "%s/secrets2", dir);
	unlink(p);
	snprintf(p, sizeof(p), "%s/more.conf", dir);
	unlink(p);
	rmdir(dir);
	return 0;
}

static void
test_valid(void **state)
{
	agent_config *cfg;

	(void) state;
	cfg = load(BASE "limits = { max_jobs = 2; };\n"
			   "services = { mqtt-subscriber = ( { argv = [\"/usr/bin/git\", \"pull\"]; cwd = \"/opt\"; timeout = 12;"
			   " env = { HOME = \"/root\"; }; }, { argv = [\"/bin/true\"]; } ); };\n");
	if (cfg == NULL)
		fail_msg("%s", err);
	assert_string_equal(cfg->listen_host, "127.0.0.1");
	assert_int_equal(cfg->listen_port, 8750);
	assert_int_equal(cfg->nsecrets, 1);
	assert_int_equal(cfg->max_jobs, 2);
	assert_int_equal(cfg->max_body, 16384);
	assert_int_equal(cfg->output_tail, 65536);
	assert_int_equal(cfg->nservices, 1);
	assert_string_equal(cfg->services[0].name, "mqtt-subscriber");
	assert_int_equal(cfg->services[0].nsteps, 2);
	assert_string_equal(cfg->services[0].steps[0].argv[1], "pull");
	assert_int_equal(cfg->services[0].steps[0].timeout, 12);
	assert_string_equal(cfg->services[0].steps[0].env[0].value, "/root");
	assert_string_equal(cfg->services[0].steps[1].cwd, "/");
	assert_int_equal(cfg->services[0].steps[1].timeout, 300);
	assert_non_null(config_find_service(cfg, "mqtt-subscriber"));
	assert_null(config_find_service(cfg, "other"));
	config_free(cfg);
}

/*
 * Every configured service is found by name, whatever its place in the
 * configuration, and names around them are not.
 */
static void
test_find_service(void **state)
{
	static const char *const names[] = {"web", "api", "zeta", "mqtt-subscriber", "b", "a-b"};
	static const char *const absent[] = {"", "a", "aa", "zz", "mqtt", "webx", "c"};
	char		text[4096];
	size_t		len;
	agent_config *cfg;

	(void) state;
	len = (size_t) snprintf(text, sizeof(text), BASE "services = {\n");
	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		len += (size_t) snprintf(text + len, sizeof(text) - len,
								 "  %s = ( { argv = [\"/bin/true\"]; } );\n", names[i]);
	snprintf(text + len, sizeof(text) - len, "};\n");
	cfg = load(text);
	if (cfg == NULL)
		fail_msg("%s", err);
	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		assert_ptr_equal(config_find_service(cfg, names[i]), &cfg->services[i]);
	for (size_t i = 0; i < sizeof(absent) / sizeof(absent[0]); i++)
		assert_null(config_find_service(cfg, absent[i]));
	config_free(cfg);
}

static void
test_unix_and_ipv6_listen(void **state)
{
	agent_config *cfg;

	(void) state;
	cfg = load("listen = \"unix:/run/ra.sock\";\nsecrets_file = \"secrets\";\nstate_dir = \"/tmp/x\";\n" SVC);
	assert_non_null(cfg);
	assert_string_equal(cfg->listen_unix, "/run/ra.sock");
	config_free(cfg);
	cfg = load("listen = \"[::1]:9000\";\nsecrets_file = \"secrets\";\nstate_dir = \"/tmp/x\";\n" SVC);
	assert_non_null(cfg);
	assert_string_equal(cfg->listen_host, "::1");
	config_free(cfg);
}

static void
test_credentials_directory(void **state)
{
	agent_config *cfg;
	char		expect[600];

	(void) state;
	write_file("secrets2", GOOD_SECRET "\n");
	setenv("CREDENTIALS_DIRECTORY", dir, 1);
	cfg = load("listen = \"127.0.0.1:1\";\nsecrets_file = \"secrets2\";\nstate_dir = \"/tmp/x\";\n" SVC);
	unsetenv("CREDENTIALS_DIRECTORY");
	if (cfg == NULL)
		fail_msg("%s", err);
	snprintf(expect, sizeof(expect), "%s/secrets2", dir);
	assert_string_equal(cfg->secrets_file, expect);
	config_free(cfg);
}

static void
test_syntax_error(void **state)
{
	(void) state;
	refused(BASE "services = = 3;\n" SVC, ":4: syntax error", NULL);
}

static void
test_missing_file(void **state)
{
	agent_config *cfg;

	(void) state;
	cfg = config_load("/nonexistent/agent.conf", err, sizeof(err));
	assert_null(cfg);
	assert_non_null(strstr(err, "/nonexistent/agent.conf"));
}

static void
test_missing_listen(void **state)
{
	(void) state;
	refused("secrets_file = \"secrets\";\nstate_dir = \"/tmp/x\";\n" SVC, "listen: missing", NULL);
}

static void
test_bad_listen(void **state)
{
	(void) state;
	refused("listen = \"127.0.0.1:99999\";\nsecrets_file = \"secrets\";\nstate_dir = \"/tmp/x\";\n" SVC,
			":1: listen:", "port");
	refused("listen = \"localhost\";\nsecrets_file = \"secrets\";\nstate_dir = \"/tmp/x\";\n" SVC,
			":1: listen:", "host:port");
	refused("listen = 8750;\n" SVC, ":1: listen:", "string");
}

static void
test_unknown_key(void **state)
{
	(void) state;
	refused(BASE "limts = { max_jobs = 2; };\n" SVC, ":4: limts:", "unknown key");
	refused(BASE "limits = { max_job = 2; };\n" SVC, ":4: limits.max_job:", "unknown key");
	refused(BASE "services = { web = ( { argv = [\"/bin/true\"]; tmeout = 3; } ); };\n",
			":4: services.web[0].tmeout:", "unknown key");
}

static void
test_limits(void **state)
{
	(void) state;
	refused(BASE "limits = { max_jobs = 0; };\n" SVC, ":4: limits.max_jobs:", "between");
	refused(BASE "limits = { max_body = \"big\"; };\n" SVC, ":4: limits.max_body:", "integer");
	refused(BASE "limits = { max_wait = 100; connection_timeout = 60; };\n" SVC,
			"limits.connection_timeout:", "max_wait");
}

/*
 * The largest job record must fit the journal: output_tail is capped at
 * 1 MiB and a step's argv at 4096 bytes, so that a record written with a
 * sixfold JSON escape of each still loads back at start.
 */
static void
test_record_bounds(void **state)
{
	agent_config *cfg;
	char		text[8192];
	char		arg[4100];

	(void) state;
	refused(BASE "limits = { output_tail = 1048577; };\n" SVC, ":4: limits.output_tail:", "between");
	refused(BASE "limits = { output_tail = 16777216; };\n" SVC, ":4: limits.output_tail:", "between");
	cfg = load(BASE "limits = { output_tail = 1048576; };\n" SVC);
	if (cfg == NULL)
		fail_msg("%s", err);
	assert_int_equal(cfg->output_tail, 1048576);
	config_free(cfg);
	memset(arg, 'a', 4090);
	arg[4090] = '\0';
	snprintf(text, sizeof(text), BASE "services = { web = ( { argv = [\"/bin/true\", \"%s\"]; } ); };\n", arg);
	refused(text, ":4: services.web[0].argv:", "4096 bytes");
}

static void
test_state_dir(void **state)
{
	(void) state;
	refused("listen = \"127.0.0.1:1\";\nsecrets_file = \"secrets\";\nstate_dir = \"relative\";\n" SVC,
			":3: state_dir:", "absolute");
}

static void
test_services(void **state)
{
	(void) state;
	refused(BASE, "services: missing", NULL);
	refused(BASE "services = { };\n", ":4: services:", "at least one");
	refused(BASE "services = { web = ( ); };\n", ":4: services.web:", "1..32 steps");
	refused(BASE "services = { web = (\n { argv = [\"bin/true\"]; } ); };\n",
			":5: services.web[0].argv:", "absolute");
	refused(BASE "services = { web = (\n { cwd = \"/\"; } ); };\n", "services.web[0].argv:", "missing");
	refused(BASE "services = { web = ( { argv = [\"/bin/true\"]; cwd = \"tmp\"; } ); };\n",
			":4: services.web[0].cwd:", "absolute");
	refused(BASE "services = { web = ( { argv = [\"/bin/true\"]; timeout = 0; } ); };\n",
			":4: services.web[0].timeout:", "between");
	refused(BASE "services = { web = ( { argv = [\"/bin/true\"]; env = { X = 1; }; } ); };\n",
			":4: services.web[0].env:", "string");
	refused(BASE "services = { web = ( { argv = [\"/bin/true\"]; env = ( \"X=1\" ); } ); };\n",
			":4: services.web[0].env:", "group");
	refused(BASE "services = { web = ( { argv = []; } ); };\n",
			":4: services.web[0].argv:", "1..256");
}

/*
 * A service written as label = { name = "..."; steps = (...); } takes any
 * name the registry accepts, also those libconfig cannot have as a label
 * ("api.v2", "1web"); the label is then only a label.
 */
static void
test_service_names(void **state)
{
	agent_config *cfg;

	(void) state;
	cfg = load(BASE "services = {\n"
			   "  web = ( { argv = [\"/bin/true\"]; } );\n"
			   "  dotted = { name = \"api.v2\"; steps = ( { argv = [\"/bin/true\"]; } ); };\n"
			   "  digit = { name = \"1web\"; steps = ( { argv = [\"/bin/true\"]; }, { argv = [\"/bin/echo\"]; } ); };\n"
			   "};\n");
	if (cfg == NULL)
		fail_msg("%s", err);
	assert_non_null(config_find_service(cfg, "web"));
	assert_non_null(config_find_service(cfg, "api.v2"));
	assert_int_equal(config_find_service(cfg, "1web")->nsteps, 2);
	assert_null(config_find_service(cfg, "dotted"));
	assert_null(config_find_service(cfg, "digit"));
	config_free(cfg);

	refused(BASE "services = {\n x = { name = \"a b\"; steps = ( { argv = [\"/bin/true\"]; } ); }; };\n",
			":5: services.x.name:", "letters, digits");
	refused(BASE "services = {\n x = { name = \".x\"; steps = ( { argv = [\"/bin/true\"]; } ); }; };\n",
			":5: services.x.name:", "the first a letter or digit");
	refused(BASE "services = {\n x = { steps = ( { argv = [\"/bin/true\"]; } ); }; };\n",
			":5: services.x.name:", "missing");
	refused(BASE "services = {\n x = { name = \"x\"; }; };\n", ":5: services.x:", "must have steps");
	refused(BASE "services = {\n x = { name = \"x\"; steps = ( ); }; };\n", "services.x.steps:", "1..32 steps");
	/* Labels the registry could never ask for. */
	refused(BASE "services = {\n web* = ( { argv = [\"/bin/true\"]; } ); };\n",
			":5: services.web*:", "letters, digits");
	refused(BASE "services = {\n a234567890123456789012345678901234567890123456789012345678901234 = "
			"( { argv = [\"/bin/true\"]; } ); };\n", "services.a2345", "1..63");
	refused(BASE "services = {\n x = { name = \"x\"; steps = ( { argv = [\"/bin/true\"]; } ); other = 1; }; };\n",
			"services.x.other", NULL);
	refused(BASE "services = {\n x = { name = \"x\"; steps = ( { argv = [\"bin/true\"]; } ); }; };\n",
			"services.x[0].argv:", "absolute");
	/* a name configured twice: the second occurrence's line and key, and the first's */
	refused(BASE "services = {\n web = ( { argv = [\"/bin/true\"]; } );\n"
			"  also = { name = \"web\"; steps = ( { argv = [\"/bin/true\"]; } ); }; };\n",
			":6: services.also.name: service \"web\" is configured twice", "(first at line 5, services.web)");
	refused(BASE "services = {\n b = { name = \"api.v2\";\n steps = ( { argv = [\"/bin/true\"]; } ); };\n"
			" web = ( { argv = [\"/bin/true\"]; } );\n"
			" a = {\n  steps = ( { argv = [\"/bin/true\"]; } );\n  name = \"api.v2\"; };\n"
			" c = { name = \"api.v2\"; steps = ( { argv = [\"/bin/true\"]; } ); }; };\n",
			":10: services.a.name: service \"api.v2\" is configured twice", "(first at line 5, services.b.name)");
	/*
	 * services of an @include'd file: a message names the file of the line
	 * (as a syntax error there does), and the first occurrence's file when
	 * it is another
	 */
	{
		char		conf[1200];
		char		incl[600];
		char		frag[1400];

		snprintf(incl, sizeof(incl), "%s/more.conf", dir);
		write_file("more.conf", " web2 = ( { argv = [\"/bin/true\"]; } );\n"
				   " x = { name = \"web\"; steps = ( { argv = [\"/bin/true\"]; } ); };\n");
		snprintf(conf, sizeof(conf), BASE "services = {\n web = ( { argv = [\"/bin/true\"]; } );\n"
				 "@include \"%s\"\n};\n", incl);
		snprintf(frag, sizeof(frag), "%s:2: services.x.name: service \"web\" is configured twice", incl);
		refused(conf, frag, NULL);
		snprintf(frag, sizeof(frag), "(first at %s:5, services.web)", path);
		refused(conf, frag, NULL);
		write_file("more.conf", "\n x = { name = \"web2\"; steps = ( { argv = [\"bin/true\"]; } ); };\n");
		snprintf(frag, sizeof(frag), "%s:2: services.x[0].argv:", incl);
		refused(conf, frag, "absolute");
	}
}

static void
test_secrets(void **state)
{
	(void) state;
	write_file("secrets2", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\nnot-a-secret\n");
	refused("listen = \"127.0.0.1:1\";\nsecrets_file = \"secrets2\";\nstate_dir = \"/tmp/x\";\n" SVC,
			"secrets2:2:", "whsec_");
	write_file("secrets2", "# only a comment\n");
	refused("listen = \"127.0.0.1:1\";\nsecrets_file = \"secrets2\";\nstate_dir = \"/tmp/x\";\n" SVC,
			":2: secrets_file:", "no secret");
	refused("listen = \"127.0.0.1:1\";\nsecrets_file = \"nope\";\nstate_dir = \"/tmp/x\";\n" SVC,
			":2: secrets_file:", "cannot open");
	write_file("secrets2", "whsec_YWJj\n");
	refused("listen = \"127.0.0.1:1\";\nsecrets_file = \"secrets2\";\nstate_dir = \"/tmp/x\";\n" SVC,
			"secrets2:1:", "24..64");
}

static void
test_tls_pair(void **state)
{
	(void) state;
	refused(BASE "tls_cert = \"/etc/hostname\";\n" SVC, "tls_key:", "together");
	refused(BASE "tls_cert = \"/nonexistent.pem\";\ntls_key = \"/nonexistent.key\";\n" SVC,
			":4: tls_cert:", "cannot read");
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_valid),
		cmocka_unit_test(test_unix_and_ipv6_listen),
		cmocka_unit_test(test_credentials_directory),
		cmocka_unit_test(test_syntax_error),
		cmocka_unit_test(test_missing_file),
		cmocka_unit_test(test_missing_listen),
		cmocka_unit_test(test_bad_listen),
		cmocka_unit_test(test_unknown_key),
		cmocka_unit_test(test_service_names),
		cmocka_unit_test(test_limits),
		cmocka_unit_test(test_record_bounds),
		cmocka_unit_test(test_state_dir),
		cmocka_unit_test(test_services),
		cmocka_unit_test(test_find_service),
		cmocka_unit_test(test_secrets),
		cmocka_unit_test(test_tls_pair),
	};

	return cmocka_run_group_tests_name("config", tests, setup, teardown);
}
