/* Loom core: helpers shared by the image_*.c files; not part of the public
 * API. */
#ifndef LOOM_IMAGE_INTERNAL_H
#define LOOM_IMAGE_INTERNAL_H

#include "image.h"

/* Check that `t` is a u8 (H, W, C) image with H, W, C >= 1 and set `*out`
 * to a contiguous view of it (a new reference, or a copy when `t` is not
 * contiguous). `op` and `arg` name the caller in error messages. */
int loom_image_contiguous_hwc(loom_tensor *out, const loom_tensor *t, const char *op, const char *arg);

#endif
