# Loom build. `make` builds libloom (static and shared), the Lua module and
# bin/loom; `make test` runs the whole suite; `make asan` runs it under
# AddressSanitizer and UndefinedBehaviorSanitizer. BUILD selects the object
# directory so several builds (plain, asan) can sit side by side.

BUILD   ?= build
PREFIX  ?= /usr/local
CC      ?= cc
PKG_CONFIG ?= pkg-config

# Debian packages providing each pkg-config module (see mk/deps.sh).
PKGS := lua5.4 openblas libuv libjpeg libcjson stb readline zlib

# OpenBLAS's OpenMP build (Debian libopenblas-openmp-dev): it runs its
# threads in libgomp's pool, the same pool as Loom's own parallel loops, so
# the two never compete for the cores. The run path makes the loader pick
# this build over the pthread one that Debian's alternatives may select.
MULTIARCH   := $(shell $(CC) -print-multiarch 2>/dev/null)
OPENBLAS_DIR ?= /usr/lib/$(MULTIARCH)/openblas-openmp
export PKG_CONFIG_PATH := $(OPENBLAS_DIR)/pkgconfig$(if $(PKG_CONFIG_PATH),:$(PKG_CONFIG_PATH))

OPT     ?= -O2
ARCHFLAGS ?= -march=native
CFLAGS_BASE := -std=c11 -D_GNU_SOURCE -Wall -Wextra -fPIC $(OPT) $(ARCHFLAGS) -g
# make 4.3 does not pass exported variables to $(shell), so set the path here too.
DEPS_CFLAGS := $(shell PKG_CONFIG_PATH=$(PKG_CONFIG_PATH) $(PKG_CONFIG) --cflags $(PKGS) 2>/dev/null)
DEPS_LIBS   := $(shell PKG_CONFIG_PATH=$(PKG_CONFIG_PATH) $(PKG_CONFIG) --libs $(PKGS) 2>/dev/null)
CFLAGS  += $(CFLAGS_BASE) $(DEPS_CFLAGS) -Icore -fopenmp -DLOOM_HAVE_ZLIB
LDLIBS  += $(DEPS_LIBS) -Wl,-rpath,$(OPENBLAS_DIR) -lm -lpthread -ldl -fopenmp

CORE_SRC := $(wildcard core/*.c)
# Installed headers: everything but the internal ones shared between core files.
PUBLIC_HEADERS := $(filter-out %_internal.h %_tables.h core/ops_blas.h,$(wildcard core/*.h))
CORE_OBJ := $(CORE_SRC:%.c=$(BUILD)/%.o)
BIND_SRC := $(filter-out lua/main.c,$(wildcard lua/*.c))
BIND_OBJ := $(BIND_SRC:%.c=$(BUILD)/%.o)
TEST_SRC := $(wildcard tests/c/test_*.c)
TEST_BIN := $(TEST_SRC:tests/c/%.c=$(BUILD)/tests/%)
BENCH_SRC := $(wildcard bench/*.c)
BENCH_BIN := $(BENCH_SRC:bench/%.c=$(BUILD)/bench/%)

LIB_A   := $(BUILD)/libloom.a
LIB_SO  := $(BUILD)/libloom.so
LUA_MOD := $(BUILD)/lua/loom/core.so
LOOM    := bin/loom

.PHONY: all build deps test asan install clean bench demo
# Check the packages first, then build in a sub-make so that the pkg-config
# flags above are read after a missing package has been installed.
all:
	@sh mk/deps.sh check $(PKGS)
	@$(MAKE) --no-print-directory build

build: $(LIB_A) $(LIB_SO) $(LUA_MOD) $(LOOM) $(TEST_BIN)

deps:
	@sh mk/deps.sh install $(PKGS)

$(BUILD)/%.o: %.c $(wildcard core/*.h lua/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Ilua -c $< -o $@

$(LIB_A): $(CORE_OBJ)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(LIB_SO): $(CORE_OBJ)
	$(CC) -shared -o $@ $^ $(LDFLAGS) $(LDLIBS)

# The module a stock lua5.4 loads with require "loom.core".
$(LUA_MOD): $(BIND_OBJ) $(LIB_A)
	@mkdir -p $(dir $@)
	$(CC) -shared -o $@ $(BIND_OBJ) $(LIB_A) $(LDFLAGS) $(LDLIBS)

$(LOOM): $(BUILD)/lua/main.o $(BIND_OBJ) $(LIB_A)
	@mkdir -p bin
	$(CC) -rdynamic -o $@ $^ $(LDFLAGS) $(LDLIBS)

# Benchmark programs: bench/*.c, each built into $(BUILD)/bench/.
$(BUILD)/bench/%: bench/%.c $(LIB_A)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $< -o $@ $(LIB_A) $(LDFLAGS) $(LDLIBS)

$(BUILD)/tests/%: tests/c/%.c tests/c/check.h $(LIB_A)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests/c $< -o $@ $(LIB_A) $(LDFLAGS) $(LDLIBS)

test: all
	@BUILD=$(BUILD) LOOM=$(LOOM) sh tests/run_all.sh

# The whole suite under ASan + UBSan, in its own object directory and binary.
asan:
	LOOM_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)" \
	$(MAKE) BUILD=build-asan LOOM=bin/loom-asan OPT="-O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined" \
	    LDFLAGS="-fsanitize=address,undefined" test

# The main job on the shipped defaults: LLaVA on a photo with the tiny
# random-weight checkpoint (see README.md for what that checkpoint is).
DEMO_ARGS ?= --model examples/models/tiny-llava --image examples/images/cat.png \
	--prompt "What is in the picture?" --max-new-tokens 24
demo: all
	@echo '$(LOOM) scripts/llava.lua $(DEMO_ARGS)'
	@$(LOOM) scripts/llava.lua $(DEMO_ARGS)

bench: all $(BENCH_BIN)
	@for b in $(BENCH_BIN); do $$b; done

install: all
	install -d $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/include/loom $(DESTDIR)$(PREFIX)/bin \
	    $(DESTDIR)$(PREFIX)/lib/pkgconfig $(DESTDIR)$(PREFIX)/share/lua/5.4/loom \
	    $(DESTDIR)$(PREFIX)/lib/lua/5.4/loom
	install -m 644 $(LIB_A) $(LIB_SO) $(DESTDIR)$(PREFIX)/lib/
	install -m 644 $(PUBLIC_HEADERS) $(DESTDIR)$(PREFIX)/include/loom/
	install -m 755 $(LOOM) $(DESTDIR)$(PREFIX)/bin/loom
	install -m 755 $(LUA_MOD) $(DESTDIR)$(PREFIX)/lib/lua/5.4/loom/core.so
	cp -r lua/loom/. $(DESTDIR)$(PREFIX)/share/lua/5.4/loom/
	sed -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@OPENBLAS_DIR@|$(OPENBLAS_DIR)|g' -e 's|@VERSION@|$(shell sed -n 's/#define LOOM_VERSION "\(.*\)"/\1/p' core/base.h)|' \
	    mk/loom.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/loom.pc

clean:
	rm -rf build build-* bin

