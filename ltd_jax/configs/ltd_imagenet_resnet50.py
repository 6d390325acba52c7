"""LTD on TRADES, ImageNet, ResNet-50 student and naturally trained ResNet-50 teacher (LTD paper
section 5 and A.1-A.3): eps 4/255, PGD-6 training attack (step 1/255, not given in the paper),
T_t = 5, beta 6; 90 epochs, SGD lr 0.1 / 10 at 50, Nesterov, wd 1e-4, batch 320;
random-resized-crop 224 for training, centre crop 224 of the 256-resized image for evaluation.
Evaluated, as RobustBench does, on 5,000 validation images. The teacher stage trains
configs/natural_imagenet_resnet50.py in WORKDIR/teacher.
"""

from ltd_jax.configs import natural_imagenet_resnet50


def get_config():
  c = natural_imagenet_resnet50.get_config()
  c.method = 'ltd'
  c.reference_bn_passes = True  # running statistics as the TRADES code's forwards
  c.ltd.base = 'trades'
  c.ltd.teacher_temperature = 5.0
  c.ltd.student_temperature = 1.0
  c.trades.beta = 6.0
  c.attack.steps = 6
  c.attack.alpha = 1 / 255
  c.attack.init = 'normal'
  c.teacher.source = 'train'
  c.teacher.config = 'natural_imagenet_resnet50'
  c.eval.during_training = ('clean', 'pgd20')
  c.eval.final = ('clean', 'fgsm', 'pgd20', 'cw')
  c.eval.subset_size = 1000
  c.eval.final_subset_size = 5000
  c.eval.alpha = 1 / 255
  c.eval.selection = 'robust'
  return c
