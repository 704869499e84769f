// SPDX-License-Identifier: GPL-2.0
/* Copyright (c) 2000-2003 Silicon Graphics, Inc. All Rights Reserved. (rounddown_64, roundup_64) */
/* A stand-in for xfstests' src/global.h (which includes its autoconf config.h): the system headers
 * fsx.c needs, and nothing optional (no AIO, io_uring, fallocate, clone or copy-range operations). */
#ifndef GLOBAL_H
#define GLOBAL_H
#define _GNU_SOURCE 1
#include <sys/types.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/ioctl.h>
#include <sys/param.h>
#include <fcntl.h>
#include <unistd.h>
#include <errno.h>
#include <string.h>
#include <stdlib.h>
#include <assert.h>
#include <libgen.h>
#include <getopt.h>

/* from xfstests' src/global.h */
static inline unsigned long long
rounddown_64(unsigned long long x, unsigned int y)
{
	x /= y;
	return x * y;
}

static inline unsigned long long
roundup_64(unsigned long long x, unsigned int y)
{
	return rounddown_64(x + y - 1, y);
}
#endif
