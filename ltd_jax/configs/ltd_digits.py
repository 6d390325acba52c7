"""LTD on digits: a naturally trained teacher (small CNN) first, then TRADES where the natural
term uses the teacher's soft labels at T_t = 5 (student T_s = 1, never applied at evaluation)."""

from ltd_jax.configs import trades_digits


def get_config():
  c = trades_digits.get_config()
  c.method = 'ltd'
  c.ltd.base = 'trades'
  c.ltd.teacher_temperature = 5.0
  c.ltd.student_temperature = 1.0
  c.teacher.source = 'train'
  c.teacher.config = 'natural_digits'
  return c
