# Build and run the safetensors fuzz target with clang's libFuzzer, apart from
# the main Makefile. From the repository root:
#   make -f tests/fuzz/fuzz.mk run FUZZ_SECONDS=60
# The corpus grows in $(FUZZ_BUILD)/corpus_safetensors; a crashing input is
# saved there as crash-<sha1> and can be replayed by passing its path to
# $(FUZZ_BUILD)/fuzz_safetensors.

CLANG        ?= clang
PKG_CONFIG   ?= pkg-config
FUZZ_BUILD   ?= build-fuzz
FUZZ_SECONDS ?= 60

FUZZ_CFLAGS := -std=c11 -D_GNU_SOURCE -g -O1 -fno-omit-frame-pointer \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -Icore $(shell $(PKG_CONFIG) --cflags libcjson)
FUZZ_LIBS := $(shell $(PKG_CONFIG) --libs libcjson) -lm
FUZZ_SRC := tests/fuzz/fuzz_safetensors.c core/safetensors.c core/tensor.c core/base.c

.PHONY: run
run: $(FUZZ_BUILD)/fuzz_safetensors
	@mkdir -p $(FUZZ_BUILD)/corpus_safetensors
	$(FUZZ_BUILD)/fuzz_safetensors -max_total_time=$(FUZZ_SECONDS) -max_len=4096 \
	    -dict=tests/fuzz/safetensors.dict -artifact_prefix=$(FUZZ_BUILD)/corpus_safetensors/ \
	    $(FUZZ_BUILD)/corpus_safetensors tests/fuzz/seeds_safetensors

$(FUZZ_BUILD)/fuzz_safetensors: $(FUZZ_SRC) core/safetensors.h core/tensor.h core/base.h
	@mkdir -p $(FUZZ_BUILD)
	$(CLANG) $(FUZZ_CFLAGS) $(FUZZ_SRC) -o $@ $(FUZZ_LIBS)
