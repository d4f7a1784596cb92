"""The "squeeze" stage: train a teacher on the full training set, or import a checkpoint."""

from ddkit.teacher.squeeze import (
    Teacher,
    TeacherConfig,
    as_teacher,
    check_teacher,
    check_teacher_artifact,
    import_teacher,
    saved_teacher,
    teacher_ensemble,
    train_teacher,
)

__all__ = ["Teacher", "TeacherConfig", "as_teacher", "check_teacher", "check_teacher_artifact", "import_teacher",
           "saved_teacher", "teacher_ensemble", "train_teacher"]
