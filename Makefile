# Makefile for the restart_worker extension (PGXS) and its restart agent.

MODULE_big = restart_worker
OBJS = restart_worker.o $(patsubst %.c,%.o,$(wildcard src/*.c))

EXTENSION = restart_worker
DATA_built = restart_worker--1.12.sql
# Earlier versions: the install script of 1.0 as it shipped, and the upgrades from it.
DATA = src/sql/versions/restart_worker--1.0.sql src/sql/versions/restart_worker--1.0--1.1.sql \
	src/sql/versions/restart_worker--1.1--1.2.sql src/sql/versions/restart_worker--1.2--1.3.sql \
	src/sql/versions/restart_worker--1.3--1.4.sql src/sql/versions/restart_worker--1.4--1.5.sql \
	src/sql/versions/restart_worker--1.5--1.6.sql src/sql/versions/restart_worker--1.6--1.7.sql \
	src/sql/versions/restart_worker--1.7--1.8.sql src/sql/versions/restart_worker--1.8--1.9.sql \
	src/sql/versions/restart_worker--1.9--1.10.sql src/sql/versions/restart_worker--1.10--1.11.sql \
	src/sql/versions/restart_worker--1.11--1.12.sql
SQL_PARTS = $(sort $(wildcard src/sql/*.sql))

REGRESS = install_plain install_supabase request_errors roles_rls admin shadowing wake record_jobs \
	lookups claims upgrade
REGRESS_OPTS = --temp-instance=./tmp_regress --temp-config=$(srcdir)/test/regress.conf

PG_CPPFLAGS = -Isrc -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers
SHLIB_LINK = -lcurl -lcrypto
EXTRA_CLEAN = tmp_regress tmp_check results regression.diffs regression.out

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# The install script is assembled from one file per concern.
restart_worker--1.12.sql: $(SQL_PARTS)
	cat $(SQL_PARTS) > $@

# The agent has its own Makefile; it is built with the extension unless AGENT=no (a
# database server needs only the extension, a target host only the agent).
AGENT ?= yes
.PHONY: agent agent-install agent-clean
ifeq ($(AGENT),yes)
all: agent
install: agent-install
endif
clean: agent-clean

agent:
	$(MAKE) -C agent all
agent-install:
	$(MAKE) -C agent install
agent-clean:
	$(MAKE) -C agent clean
