/* Loom core library: the umbrella header for C programs that link libloom
 * (pkg-config --cflags --libs loom). Each part can also be included alone. */
#ifndef LOOM_H
#define LOOM_H

#include "base.h"
#include "image.h"
#include "ops.h"
#include "pytorch.h"
#include "safetensors.h"
#include "tensor.h"
#include "tokenizer.h"

#endif
